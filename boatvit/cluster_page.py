"""An interactive page of the feature-space clusters (``boatvit clusters IMAGE -o page.html``).

One self-contained HTML file (``cluster_page.html`` with the data put in): pick an image, an FSLA layer and a head,
point at a patch, and see beside each other

* its feature-space cluster: the tokens the layer's clustering put in the pointed token's cluster (the tokens whose
  queries attend to each other's keys), and, marked apart, the ``overlap`` tokens of the sibling cluster that the
  pointed token's query also attends to (cluster ``2j``: the first ``overlap`` slots of ``2j+1``; ``2j+1``: the last
  ``overlap`` slots of ``2j``; see `boatvit.clustering.token_slots`);
* its image-space neighbourhood in the same block: the tokens its Swin window attention lets it see (in a shifted
  block the shifted window, split where timm's mask splits it at the image border), or for CSWin the cross of its
  vertical stripe (the first half of the image-space heads) and its horizontal stripe (the second half), or the
  whole image in a stage with global attention;

with the model's top classes. The page holds the model's input image (a PNG data URI) and every token's slot in the
padded clustered order per layer and head (`boatvit.cluster_pictures.cluster_slots`), and requests nothing.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.models.swin_transformer import SwinTransformerBlock, window_partition

from .cluster_pictures import LayerClusters, check_output_folder, cluster_slots, none_readable, open_cluster_model
from .errors import UsageError
from .prediction import class_names
from .runs import atomic_path

__all__ = ['ClusterPage', 'image_space_regions', 'write_cluster_page']

PAGE_SUFFIXES = ('.html', '.htm')


def image_space_regions(block: torch.nn.Module, grid: Tuple[int, int]) -> Tuple[List[np.ndarray], str]:
    """Which tokens a block's image-space attention lets attend to each other, on its ``grid`` ``(h, w)``.

    Returns:
        One or two ``(h * w,)`` int arrays of region ids, and a description of them. Two tokens see each other
        when they share an id in one of the arrays: a Swin block gives one (its windows, after timm's own cyclic
        shift, padding and shift mask, so a shifted window cut by the border is two or four regions); a CSWin
        block two, its vertical and its horizontal stripes (each seen by half of its heads), or one in a stage
        with global attention.
    """
    h, w = grid
    if isinstance(block, SwinTransformerBlock):
        return [_swin_regions(block, h, w)], _swin_description(block)
    attention = block.attn
    if attention.global_attention:
        return [np.zeros(h * w, dtype=np.int64)], 'global attention (the whole image)'
    s = attention.split_size
    rows, cols = np.divmod(np.arange(h * w), w)
    # stripe_attention clamps a stripe wider than the image to the image
    return [cols // min(s, w), rows // min(s, h)], f'the cross of its stripes (width {s}), each seen by half the heads'


def _swin_regions(block: SwinTransformerBlock, h: int, w: int) -> np.ndarray:
    """Region ids from the token indices put through the block's own roll, padding and window partition, split by
    its own shift mask: the neighbourhood is what timm computes, not a re-derivation of it."""
    (wh, ww), shift = block.window_size, block.shift_size
    index = torch.arange(h * w, dtype=torch.float32).view(1, h, w, 1)
    if any(shift):
        index = torch.roll(index, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    index = F.pad(index, (0, 0, 0, -w % ww, 0, -h % wh), value=-1.0)  # padding: no token
    tokens = window_partition(index, (wh, ww)).reshape(-1, wh * ww).long()  # (windows, area)
    mask = block.get_attn_mask(index)  # (windows, area, area), 0 where attention is allowed; None unshifted
    partner = torch.zeros_like(tokens) if mask is None else (mask == 0).int().argmax(-1)
    region = torch.arange(tokens.shape[0])[:, None] * wh * ww + partner  # a window's first token its query may see
    regions = np.empty(h * w, dtype=np.int64)
    real = tokens >= 0
    regions[tokens[real].numpy()] = region[real].numpy()
    return regions


def _swin_description(block: SwinTransformerBlock) -> str:
    (wh, ww), (sh, sw) = block.window_size, block.shift_size
    if sh or sw:
        return f'its shifted {wh}x{ww} window (shift {sh}, {sw}; split where it wraps around the border)'
    return f'its {wh}x{ww} window'


@dataclasses.dataclass
class ClusterPage:
    """What `write_cluster_page` did: the model name, its layers on the page, the page, its size in bytes, and the
    reasons the unreadable images were skipped."""

    name: str
    layers: List[str]
    path: Path
    size: int
    skipped: List[str]


def write_cluster_page(
    images: Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]],
    out: Union[str, os.PathLike],
    weights: Optional[Union[str, os.PathLike]] = None,
    model: Optional[str] = None,
    model_kwargs: Optional[Mapping[str, Any]] = None,
    use_ema: bool = True,
    layers: Optional[Sequence[str]] = None,
    panel_px: int = 384,
    topk: int = 5,
) -> ClusterPage:
    """Write the interactive cluster page of one image or several (see the module docstring), atomically.

    Args:
        images: an image file, or several (one page, with an image picker).
        out: the ``.html`` file to write; its folder must exist.
        weights: any weight source (`boatvit.weights.load_model`); None looks at an untrained ``model``.
        model, model_kwargs, use_ema: see `boatvit.weights.load_model`.
        layers: FSLA layers (`boatvit.cluster_pictures.choose_layers`); default: all of them.
        panel_px: side of each image panel on the page, in CSS pixels.
        topk: the classes shown per image.

    Returns:
        `ClusterPage`; of several images, the unreadable ones are skipped with their reason.

    Raises:
        UsageError: bad arguments or weights, a model or layer without FSLA, each named; an unreadable image when it
            is the only one, or when none of several could be read (`boatvit.errors.UnreadableImageError`).
    """
    paths = [Path(images)] if isinstance(images, (str, os.PathLike)) else [Path(p) for p in images]
    out = Path(out)
    if out.suffix.lower() not in PAGE_SUFFIXES:
        raise UsageError(f'{out}: the page must be a .html file')
    check_output_folder(out)
    if panel_px < 64:
        raise UsageError(f'--panel-size must be at least 64 pixels, got {panel_px}')
    opened = open_cluster_model(weights, model, model_kwargs, use_ema, layers or ['all'])
    names = class_names(opened.model.num_classes, opened.metadata) if opened.model.num_classes else []

    skipped: List[str] = []
    shown, clusters = [], {}
    for i, pixels in opened.inputs(paths, skipped):
        output, clusters = cluster_slots(opened.model, pixels[None], opened.layers)
        shown.append(
            {
                'name': paths[i].name,
                'src': _png_data_uri(opened.plain(pixels)),
                'top': _top_classes(output[0], names, topk),
                'slots': [clusters[layer].slots[0].flatten(1).tolist() for layer in opened.layers],
            }
        )
    if not shown:
        raise none_readable(paths, skipped)
    # every image has the model's input size, so a layer's grid and neighbourhoods are those of any of them
    data = {
        'model': opened.name,
        'panel': panel_px,
        'layers': [_layer_entry(opened.model, name, clusters[name]) for name in opened.layers],
        'images': shown,
    }
    # '</' inside the JSON would end its <script> element early (a class name or file name may hold one)
    text = json.dumps(data, separators=(',', ':')).replace('</', '<\\/')
    template = resources.files(__package__).joinpath('cluster_page.html').read_text(encoding='utf-8')
    page = template.replace('__DATA__', text)
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding='utf-8')
    return ClusterPage(opened.name, opened.layers, out, len(page.encode('utf-8')), skipped)


def _layer_entry(model: torch.nn.Module, name: str, clusters: LayerClusters) -> Dict[str, Any]:
    """What the page needs of one layer besides the slots: its grid, clustering and image-space neighbourhood."""
    _, heads, h, w = clusters.slots.shape
    block = model.get_submodule(name.rsplit('.', 1)[0])
    regions, space = image_space_regions(block, (h, w))
    return {
        'name': name.removesuffix('.fsla'),
        'grid': [h, w],
        'heads': heads,
        'clusterSize': clusters.cluster_size,
        'clusters': int(clusters.labels.max()) + 1,
        'overlap': clusters.overlap,
        'regions': [r.tolist() for r in regions],
        'space': space,
    }


def _top_classes(logits: torch.Tensor, names: Sequence[str], topk: int) -> List[Tuple[str, float]]:
    """The ``topk`` most probable classes with their softmax probabilities; none for a model without a classifier."""
    if not names:
        return []
    probs, indices = torch.softmax(logits.float(), -1).topk(min(topk, len(names)))
    return [(names[i], round(p, 4)) for p, i in zip(probs.tolist(), indices.tolist())]


def _png_data_uri(image: np.ndarray) -> str:
    """``(H, W, 3)`` floats in [0, 1] as a ``data:image/png;base64,...`` URI."""
    buffer = io.BytesIO()
    Image.fromarray((image * 255).round().astype(np.uint8)).save(buffer, format='PNG', optimize=True)
    return 'data:image/png;base64,' + base64.b64encode(buffer.getvalue()).decode('ascii')
