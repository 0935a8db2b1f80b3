"""Miscellaneous utilities shared with NVlabs' EDM (same names, same behaviour)."""

import hashlib
import html
import io
import os
import re
import tempfile
import urllib.parse
import uuid
from typing import Any

import requests

#----------------------------------------------------------------------------

class EasyDict(dict):
    """Dict whose keys are also attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        del self[name]

#----------------------------------------------------------------------------

_dnnlib_cache_dir = None

def set_cache_dir(path: str) -> None:
    global _dnnlib_cache_dir
    _dnnlib_cache_dir = path

def make_cache_dir_path(*paths: str) -> str:
    """Cache location: set_cache_dir(), $DNNLIB_CACHE_DIR, $HOME/.cache/dnnlib, or the temp dir."""
    if _dnnlib_cache_dir is not None:
        return os.path.join(_dnnlib_cache_dir, *paths)
    if 'DNNLIB_CACHE_DIR' in os.environ:
        return os.path.join(os.environ['DNNLIB_CACHE_DIR'], *paths)
    if 'HOME' in os.environ:
        return os.path.join(os.environ['HOME'], '.cache', 'dnnlib', *paths)
    if 'USERPROFILE' in os.environ:
        return os.path.join(os.environ['USERPROFILE'], '.cache', 'dnnlib', *paths)
    return os.path.join(tempfile.gettempdir(), '.cache', 'dnnlib', *paths)

#----------------------------------------------------------------------------

def is_url(obj: Any, allow_file_urls: bool = False) -> bool:
    """True if obj looks like an http(s) URL (or file:// when allowed)."""
    if not isinstance(obj, str) or not "://" in obj:
        return False
    if allow_file_urls and obj.startswith('file://'):
        return True
    try:
        res = urllib.parse.urlparse(obj)
        if not res.scheme or not res.netloc or not "." in res.netloc:
            return False
        res = urllib.parse.urlparse(urllib.parse.urljoin(obj, "/"))
        if not res.scheme or not res.netloc or not "." in res.netloc:
            return False
    except Exception:
        return False
    return True

def _url_cache_file(url: str, cache_dir: str) -> str:
    url_md5 = hashlib.md5(url.encode("utf-8")).hexdigest()
    safe_name = re.sub(r"[^0-9a-zA-Z-._]", "_", url.split('/')[-1].split('?')[0])[:64]
    return os.path.join(cache_dir, f'{url_md5}_{safe_name}')

def open_url(url: str, cache_dir: str = None, num_attempts: int = 10, verbose: bool = True,
             return_filename: bool = False, cache: bool = True, session=None) -> Any:
    """Open a local path, file:// URL or http(s) URL as a binary file object.

    Downloads are cached in `cache_dir` (default: make_cache_dir_path('downloads'))
    and written atomically. Offline, a cached copy is used; otherwise an OSError
    says which URL failed and how to provide the file by hand.
    """
    assert num_attempts >= 1
    assert not (return_filename and (not cache))

    if not re.match('^[a-z]+://', url):
        if not os.path.isfile(url):
            raise FileNotFoundError(f'{url}: no such file')
        return url if return_filename else open(url, "rb")
    if url.startswith('file://'):
        filename = urllib.parse.urlparse(url).path
        if re.match(r'^/[a-zA-Z]:', filename):
            filename = filename[1:]
        return filename if return_filename else open(filename, "rb")

    assert is_url(url)
    if cache_dir is None:
        cache_dir = make_cache_dir_path('downloads')
    cache_file = _url_cache_file(url, cache_dir)
    if cache and os.path.isfile(cache_file):
        return cache_file if return_filename else open(cache_file, "rb")

    url_data = None
    last_error = None
    with (session or requests.Session()) as sess:
        if verbose:
            print(f"Downloading {url} ...", end="", flush=True)
        for attempts_left in reversed(range(num_attempts)):
            try:
                with sess.get(url, timeout=60) as res:
                    res.raise_for_status()
                    if len(res.content) == 0:
                        raise IOError("No data received")
                    if len(res.content) < 8192:
                        content_str = res.content.decode("utf-8", errors="replace")
                        if "download_warning" in res.headers.get("Set-Cookie", ""):
                            links = [html.unescape(link) for link in content_str.split('"') if "export=download" in link]
                            if len(links) == 1:
                                url = urllib.parse.urljoin(url, links[0])
                                raise IOError("Google Drive virus checker nag")
                        if "Google Drive - Quota exceeded" in content_str:
                            raise IOError("Google Drive download quota exceeded -- please try again later")
                    url_data = res.content
                    if verbose:
                        print(" done")
                    break
            except KeyboardInterrupt:
                raise
            except requests.exceptions.HTTPError as e:
                last_error = e
                if e.response is not None and 400 <= e.response.status_code < 500:
                    break  # A client error will not go away by retrying.
            except Exception as e:
                last_error = e
                if isinstance(e, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
                    break  # Offline: retrying only delays the error.
        if url_data is None:
            if verbose:
                print(" failed")
            raise OSError(f'{url}: download failed ({type(last_error).__name__}); '
                          f'if offline, download it elsewhere and pass the local path instead')

    if cache:
        os.makedirs(cache_dir, exist_ok=True)
        temp_file = os.path.join(cache_dir, "tmp_" + uuid.uuid4().hex + "_" + os.path.basename(cache_file))
        with open(temp_file, "wb") as f:
            f.write(url_data)
        os.replace(temp_file, cache_file)
        if return_filename:
            return cache_file
    return io.BytesIO(url_data)
