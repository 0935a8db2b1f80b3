"""What every command does around its body: one-line errors and a clean exit from the torchrun group."""

import functools

import click

from torch_utils import distributed as dist

def command_body(fn):
    """Turn expected failures (bad files, bad values) into click's one-line 'Error:' and leave the
    process group; put it below the click decorators."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        finished = False
        try:
            result = fn(*args, **kwargs)
            finished = True
            return result
        except (ValueError, OSError) as e:  # CheckpointError is a ValueError.
            raise click.ClickException(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
        finally:
            dist.shutdown(finished=finished)
    return wrapper
