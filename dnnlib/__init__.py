"""A small `dnnlib`, import-compatible with NVlabs' EDM.

EDM pickles reference `dnnlib.util.EasyDict`, and source embedded in them may
`import dnnlib`; both must resolve in this project.
"""

from . import util
from .util import EasyDict, make_cache_dir_path
__all__ = ["util", "EasyDict", "make_cache_dir_path"]
