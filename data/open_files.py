"""Enough file descriptors for a blend of thousands of prefixes.

Every memory map holds a descriptor: per prefix its .bin and .idx (opened once, data.gpt_build),
and per dataset sampled its document, sample and shuffle indices (mapped when first sampled,
data.index_cache), for the train split and for validation. 2,000 prefixes need about 17,000,
past the soft `ulimit -n` of many machines (1,024 is common), where megatron-core would fail
deep inside with "Too many open files". The soft limit is raised towards the hard
one, as a user's `ulimit -n $(ulimit -Hn)` would; where the hard limit is too low, one warning.
"""
import logging

log = logging.getLogger(__name__)

PER_PREFIX = 8  # 2 maps of the prefix + 3 index maps x 2 datasets (train, validation)
BASE = 1024  # the rest of the process: libraries, sockets, checkpoints


def allow_open_files(prefixes: int) -> None:
    try:
        import resource
    except ImportError:  # not on this platform: nothing to raise
        return
    need = BASE + PER_PREFIX * prefixes
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    target = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < need:
        log.warning("data: a blend of %d prefixes may need %d open files; the hard limit (ulimit -Hn) "
                    "is %d: raise it, or merge shards", prefixes, need, hard)
