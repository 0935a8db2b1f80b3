"""Sample grids: the images of a run's first seeds in rows, optionally plain and guided side by side."""

import os

import numpy as np
import PIL.Image

from . import fileio

def tile(images, cols, pad=1, fill=255):
    """HWC uint8 images -> one HWC uint8 grid, `cols` per row, `pad` pixels of `fill` around each."""
    h, w, c = images[0].shape
    rows = -(-len(images) // cols)
    cell_h, cell_w = h + 2 * pad, w + 2 * pad
    out = np.full([rows * cell_h, cols * cell_w, c], fill, dtype=np.uint8)
    for k, im in enumerate(images):
        r, q = divmod(k, cols)
        out[r * cell_h + pad:r * cell_h + pad + h, q * cell_w + pad:q * cell_w + pad + w] = im
    return out

def side_by_side(panels, gap=4, fill=255):
    """Grids of equal height next to each other, separated by `gap` columns of `fill`."""
    h, c = panels[0].shape[0], panels[0].shape[2]
    spacer = np.full([h, gap, c], fill, dtype=np.uint8)
    parts = []
    for p in panels:
        parts += [p, spacer]
    return np.concatenate(parts[:-1], axis=1)

def save(path, grid, scale=1):
    """Write a HWC uint8 grid as PNG (mode L or RGB), upscaled by `scale` with nearest neighbours, atomically."""
    img = PIL.Image.fromarray(grid[:, :, 0], 'L') if grid.shape[2] == 1 else PIL.Image.fromarray(grid, 'RGB')
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), PIL.Image.NEAREST)
    with fileio.atomic_open(path) as f:
        img.save(f, format='png')

def folder_images(folder, seeds, subdirs=False):
    """The images of `seeds` in a generate_dg.py output folder (EDM file names)."""
    return [fileio.read_image(os.path.join(folder, fileio.image_relpath(s, subdirs))) for s in seeds]

def default_scale(resolution):
    """Upscaling that makes small images readable (8x8 digits -> 4x, 32x32 -> 1x)."""
    return max(1, 32 // resolution)
