# Minimal dnnlib, import-compatible with NVlabs' EDM: pickles refer to
# `dnnlib.util.EasyDict` and embedded network source imports `dnnlib`.
from . import util
from .util import EasyDict, make_cache_dir_path
