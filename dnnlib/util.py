"""The parts of NVlabs' `dnnlib.util` that EDM pickles and this project rely on.

EDM pickles store `dataset_kwargs` as `dnnlib.util.EasyDict`, and EDM's tools
open networks, detectors and reference statistics through `open_url`; the same
names live here. Downloads are cached the way EDM caches them (file name
`<md5 of the URL>_<sanitised name>` in `<cache>/downloads`), so a cache
directory can be shared with EDM.
"""

import glob
import hashlib
import io
import os
import re
import tempfile
import time
import urllib.parse
import uuid

import requests

#----------------------------------------------------------------------------

class EasyDict(dict):
    """A dict whose keys can also be read and written as attributes."""

    def __getattr__(self, name):
        if name in self:
            return self[name]
        raise AttributeError(name)

    def __setattr__(self, name, value):
        self[name] = value

    def __delattr__(self, name):
        if name not in self:
            raise AttributeError(name)
        del self[name]

#----------------------------------------------------------------------------
# Cache directory.

_cache_dir_override = None

def set_cache_dir(path):
    """Use `path` as the cache root (None: back to the environment's default)."""
    global _cache_dir_override
    _cache_dir_override = path

def make_cache_dir_path(*paths):
    """A path under the cache root.

    The root is the first available of: set_cache_dir(), $DNNLIB_CACHE_DIR,
    $HOME/.cache/dnnlib, $USERPROFILE/.cache/dnnlib, <temp dir>/.cache/dnnlib.
    """
    if _cache_dir_override is not None:
        return os.path.join(_cache_dir_override, *paths)
    if os.environ.get('DNNLIB_CACHE_DIR'):
        return os.path.join(os.environ['DNNLIB_CACHE_DIR'], *paths)
    home = os.environ.get('HOME') or os.environ.get('USERPROFILE') or tempfile.gettempdir()
    return os.path.join(home, '.cache', 'dnnlib', *paths)

#----------------------------------------------------------------------------
# Opening paths and URLs.

def is_url(obj, allow_file_urls=False):
    """Whether obj is an http(s) URL with a host name (or a file:// URL when allowed)."""
    if not isinstance(obj, str):
        return False
    if obj.startswith('file://'):
        return allow_file_urls
    try:
        parts = urllib.parse.urlsplit(obj)
    except ValueError:
        return False
    return parts.scheme in ('http', 'https') and '.' in (parts.hostname or '')

def _local_path(url):
    """The file named by a plain path or a file:// URL; None for other URLs."""
    if url.startswith('file://'):
        path = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
        if re.match(r'^/[A-Za-z]:[/\\]', path):
            path = path[1:]  # file:///C:/x on Windows names C:/x.
        return path
    return None if re.match(r'^[A-Za-z][A-Za-z0-9+.-]*://', url) else url

def _cache_name(url):
    digest = hashlib.md5(url.encode('utf-8')).hexdigest()
    base = url.split('?')[0].rstrip('/').split('/')[-1]
    return digest, f'{digest}_{re.sub(r"[^0-9A-Za-z._-]", "_", base)[:64]}'

def _fetch(url, num_attempts, session, verbose):
    """Bytes of an http(s) URL; a few retries for server-side errors, none when offline."""
    last_error = None
    for attempt in range(num_attempts):
        if attempt:
            time.sleep(min(2 ** attempt, 30))
        try:
            with session.get(url, timeout=60) as response:
                response.raise_for_status()
                if not response.content:
                    raise OSError('empty response')
                return response.content
        except KeyboardInterrupt:
            raise
        except requests.exceptions.HTTPError as e:
            last_error = e
            if e.response is not None and e.response.status_code < 500:
                break  # 4xx: the request itself is wrong, asking again will not help.
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as e:
            last_error = e
            break  # No route to the server: retrying only delays the message.
        except Exception as e:  # Truncated transfer, empty body, ...
            last_error = e
        if verbose:
            print(f'  attempt {attempt + 1} of {num_attempts} failed: {type(last_error).__name__}', flush=True)
    raise OSError(f'{url}: download failed ({type(last_error).__name__}); '
                  f'if offline, download it elsewhere and pass the local path instead')

def open_url(url, cache_dir=None, num_attempts=10, verbose=True, return_filename=False, cache=True, session=None):
    """Open a local path, a file:// URL or an http(s) URL for binary reading.

    Returns a file object, or with `return_filename` a path (downloads then must
    be cached). Downloads go to `cache_dir` (default make_cache_dir_path('downloads'))
    and are reused from there, also offline. Errors: FileNotFoundError for a
    missing local file, OSError naming the URL when a download fails.
    """
    if num_attempts < 1:
        raise ValueError('num_attempts must be at least 1')
    if return_filename and not cache:
        raise ValueError('return_filename needs cache=True: a download must be stored somewhere')
    path = _local_path(url)
    if path is not None:
        if not os.path.isfile(path):
            raise FileNotFoundError(f'{url}: no such file')
        return path if return_filename else open(path, 'rb')
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ('http', 'https') or not parts.hostname:
        raise ValueError(f'{url}: not a file path, file:// URL or http(s) URL')

    cache_dir = make_cache_dir_path('downloads') if cache_dir is None else cache_dir
    digest, name = _cache_name(url)
    if cache:
        hits = sorted(glob.glob(os.path.join(glob.escape(cache_dir), digest + '_*')))
        if hits:
            return hits[0] if return_filename else open(hits[0], 'rb')

    if verbose:
        print(f'Downloading {url} ...', flush=True)
    if session is None:
        with requests.Session() as own_session:
            data = _fetch(url, num_attempts, own_session, verbose)
    else:
        data = _fetch(url, num_attempts, session, verbose)
    if not cache:
        return io.BytesIO(data)

    # Write under a temporary name, then rename: readers never see half a file.
    os.makedirs(cache_dir, exist_ok=True)
    final = os.path.join(cache_dir, name)
    partial = os.path.join(cache_dir, f'tmp_{uuid.uuid4().hex}_{name}')
    try:
        with open(partial, 'wb') as f:
            f.write(data)
        os.replace(partial, final)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return final if return_filename else io.BytesIO(data)
