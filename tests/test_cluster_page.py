"""``boatvit clusters -o page.html``: the page, opened in headless Chromium, highlights what the model computed.

The expected highlight is taken from the model's own clustering (`FeatureSpaceAttention.cluster_order`, recorded
by a hook here, cut into runs of ``cluster_layout(...).cluster_sizes()``), not from the page's data.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select
from sklearn.datasets import load_sample_image

from boatvit import cli
from boatvit.cluster_page import image_space_regions
from boatvit.clustering import cluster_layout
from boatvit.data import eval_transform, open_image
from boatvit.fsla import FeatureSpaceAttention
from boatvit.models.boat_cswin import BilateralCSWinBlock
from boatvit.runs import save_weights
from boatvit.weights import load_model

# Debian's chromium and chromium-driver put them on the PATH
CHROMIUM, CHROMEDRIVER = shutil.which('chromium'), shutil.which('chromedriver')
# .ci/run sets it: there a missing browser fails the test instead of skipping it
REQUIRE_BROWSER = 'BOATVIT_REQUIRE_BROWSER'
# 60x60 input: stage 1 is a 30x30 grid, 900 tokens in 16 clusters of 57 slots with 12 ghosts, so the page's
# overlap logic meets ghosts; two heads in the first two stages so that switching heads changes something
MODEL_KWARGS = {'img_size': 60, 'num_heads': [2, 2, 4, 8]}
DATA_CONFIG = {'input_size': [3, 60, 60], 'interpolation': 'bicubic', 'mean': [0.5] * 3, 'std': [0.25] * 3,
               'crop_pct': 1.0, 'crop_mode': 'center'}  # fmt: skip


@pytest.fixture(scope='module')
def page(tmp_path_factory):
    """The page of two sample images and an unreadable file, from small random weights with class names."""
    folder = tmp_path_factory.mktemp('page')
    images = []
    for name in ('china.jpg', 'flower.jpg'):
        images.append(folder / name)
        Image.fromarray(load_sample_image(name)).save(images[-1])
    broken = folder / 'broken.jpg'
    broken.write_bytes(b'not a jpeg')
    torch.manual_seed(0)
    weights = folder / 'nano.safetensors'
    metadata = {'model': 'boat_swin_nano_32', 'model_kwargs': MODEL_KWARGS, 'data_config': DATA_CONFIG}
    metadata['classes'] = [f'class {i} </script>' for i in range(10)]  # a name that would end a <script> early
    model = timm.create_model('boat_swin_nano_32', **MODEL_KWARGS)
    save_weights(weights, model.state_dict(), metadata)
    out = folder / 'page.html'
    assert cli.main(['clusters', *map(str, images), str(broken), '--weights', str(weights), '-o', str(out)]) == 0
    return out, images, weights


def own_clusters(weights: Path, image: Path):
    """``{layer: (orders (heads, N), grid, cluster sizes, padded size, overlap)}`` and the top class, as the model
    computes them for ``image``."""
    loaded = load_model(weights)
    seen = {}

    def record(name):
        def hook(module: FeatureSpaceAttention, args):
            x, (H, W) = args
            layout = cluster_layout(H * W, module.cluster_size)
            order = module.cluster_order(x, (H, W))[0]
            seen[name] = (order, (H, W), layout.cluster_sizes(), layout.cluster_size, module.overlap)

        return hook

    for name, module in loaded.model.named_modules():
        if isinstance(module, FeatureSpaceAttention):
            module.register_forward_pre_hook(record(name.removesuffix('.fsla')))
    with torch.inference_mode():
        logits = loaded.model(eval_transform(loaded.model, loaded.metadata)(open_image(image))[None])
    return seen, loaded.metadata['classes'][int(logits.argmax())]


def expected_highlight(layer, head: int, token: int):
    """The index of the pointed token's cluster, its tokens, and the sibling tokens its query also attends to
    (`boatvit.fsla._attend_in_clusters`)."""
    order, _, sizes, padded, overlap = layer
    runs = torch.split(order[head], sizes)
    k = next(i for i, run in enumerate(runs) if token in run.tolist())
    if len(runs) == 1:
        extra = []
    elif k % 2 == 0:  # the first `overlap` slots of cluster k + 1 (its ghost, if any, is its last slot)
        extra = runs[k + 1][:overlap].tolist()
    else:  # the last `overlap` of cluster k - 1's padded slots: fewer real tokens when it holds a ghost
        extra = runs[k - 1][padded - overlap :].tolist()
    return k, sorted(runs[k].tolist()), sorted(extra)


@pytest.fixture(scope='module')
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        reason = 'no chromium or chromedriver on the PATH: apt-get install chromium chromium-driver'
        if os.environ.get(REQUIRE_BROWSER):
            pytest.fail(reason)
        pytest.skip(reason)
    profile = tempfile.mkdtemp()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # without the background-networking flags Chromium misbehaves on a machine with no outside network
    for flag in ('--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync',
                 '--window-size=1400,900', f'--user-data-dir={profile}'):  # fmt: skip
        options.add_argument(flag)
    options.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def tokens(driver, css: str):
    """The tokens of the cells that ``css`` selects: what the page shows."""
    script = f"return Array.from(document.querySelectorAll('{css}'), r => +r.dataset.token)"
    return sorted(driver.execute_script(script))


def point_at(driver, row: int, col: int, grid):
    """Move the mouse over the patch (row, col) of the feature-space panel, as a user would."""
    svg = driver.find_element(By.ID, 'feature-space')
    h, w = grid
    size = svg.size
    # Selenium's offsets are from the element's centre
    x = (col + 0.5) * size['width'] / w - size['width'] / 2
    y = (row + 0.5) * size['height'] / h - size['height'] / 2
    ActionChains(driver).move_to_element_with_offset(svg, round(x), round(y)).perform()
    return row * w + col


def check_highlight(driver, layer, head: int, token: int):
    k, cluster, extra = expected_highlight(layer, head, token)
    assert tokens(driver, '#feature-space rect.pointed') == [token]
    assert tokens(driver, '#feature-space rect.cluster') == cluster
    assert tokens(driver, '#feature-space rect.overlap') == extra
    return k, cluster


def test_page_highlights_the_models_own_clusters(page, browser):
    out, images, weights = page
    assert out.stat().st_size < 500_000  # two images, three layers: the data URI and the slots
    html = out.read_text()
    assert 'http://' not in html.replace('http://www.w3.org/2000/svg', '') and 'https://' not in html
    browser.get(out.as_uri())
    china, top = own_clusters(weights, images[0])
    assert Select(browser.find_element(By.ID, 'image-select')).options[0].text == 'china.jpg'
    assert len(Select(browser.find_element(By.ID, 'image-select')).options) == 2  # the broken file was skipped
    assert browser.find_element(By.ID, 'top').text.splitlines()[0].startswith(top)

    # layer 0, head 0: patches in even and odd clusters (an odd one's overlap is the tail of its even sibling)
    layer = china['layers.0.blocks.1']
    clusters = set()
    for row, col in [(3, 4), (20, 11), (29, 29), (0, 15), (14, 0)]:
        token = point_at(browser, row, col, layer[1])
        k, cluster = check_highlight(browser, layer, 0, token)
        clusters.add(k)
    assert {k % 2 for k in clusters} == {0, 1}
    # the image-space neighbourhood of (14, 0) in this shifted block: the 4x4 window at rows 14-17, columns 0-1
    assert tokens(browser, '#image-space rect.neighbourhood') == [r * 30 + c for r in range(14, 18) for c in (0, 1)]

    Select(browser.find_element(By.ID, 'head-select')).select_by_visible_text('1')
    _, other_head = check_highlight(browser, layer, 1, token)
    assert other_head != cluster

    Select(browser.find_element(By.ID, 'layer-select')).select_by_index(1)
    layer = china['layers.1.blocks.1']
    assert layer[1] == (15, 15)
    token = point_at(browser, 7, 3, layer[1])
    check_highlight(browser, layer, 1, token)

    Select(browser.find_element(By.ID, 'image-select')).select_by_index(1)
    flower, _ = own_clusters(weights, images[1])
    token = point_at(browser, 2, 13, layer[1])
    check_highlight(browser, flower['layers.1.blocks.1'], 1, token)

    errors = [entry for entry in browser.get_log('browser') if entry['level'] in ('SEVERE', 'WARNING')]
    assert not errors


def test_swin_neighbourhood_is_the_shifted_window():
    """A shifted 4x4 window (shift 2) on a 30x30 grid: the windows start at rows and columns 2, 6, ..., 26, and the
    strips 0-1 at the border (wrapped around by the cyclic shift) are regions of their own."""
    block = timm.models.swin_transformer.SwinTransformerBlock(8, (30, 30), 1, window_size=4, shift_size=2)
    (regions,), description = image_space_regions(block, (30, 30))
    edges = np.searchsorted([2, 6, 10, 14, 18, 22, 26], np.arange(30), side='right')
    expected = (edges[:, None] * 8 + edges[None, :]).ravel()
    assert np.array_equal(regions[:, None] == regions[None, :], expected[:, None] == expected[None, :])
    assert 'shifted 4x4 window' in description


def test_cswin_neighbourhood_is_the_cross_of_stripes():
    block = BilateralCSWinBlock(8, 2, 2, False, None, 1.0, True, 0.0, 0.0, 0.0)
    (cols, rows), description = image_space_regions(block, (5, 6))
    assert np.array_equal(cols.reshape(5, 6), np.tile(np.arange(6) // 2, (5, 1)))
    assert np.array_equal(rows.reshape(5, 6), np.tile(np.arange(5)[:, None] // 2, (1, 6)))
    assert 'stripes' in description


@pytest.mark.parametrize(
    'extra, message',
    [
        (['--layer', 'layers.0.blocks.0'], '--layer layers.0.blocks.0: no feature-space attention there'),
        (['--model-kwargs', 'fsla_blocks=none'], 'boat_swin_nano_32 has no feature-space attention layers'),
        (['--heads', '1'], '--heads 1: a page shows every head'),
        (['-o', 'missing/page.html'], 'the directory'),
    ],
)
def test_bad_page_requests_are_refused_by_name(tmp_path, page, extra, message, capsys):
    _, images, weights = page
    argv = ['clusters', str(images[0]), '--weights', str(weights), '-o', str(tmp_path / 'page.html')]
    if extra[0] == '--model-kwargs':  # no FSLA: an untrained model, as weights with FSLA would not load into it
        argv[2:4] = ['--model', 'boat_swin_nano_32']
    if extra[0] == '-o':
        argv[-1], extra = str(tmp_path / extra[1]), []
    assert cli.main(argv + extra) == 2
    assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_cswin_page_holds_stripes_and_the_global_stage(tmp_path, page):
    """A small untrained BOAT-CSWin: every FSLA layer's data, stripes in stages 1-3 and global attention in stage 4."""
    _, images, _ = page
    out = tmp_path / 'cswin.html'
    kwargs = ['embed_dim=16', 'depths=(1,1,1,1)', 'num_heads=(2,2,2,2)']
    assert (
        cli.main(
            ['clusters', str(images[0]), '--model', 'boat_cswin_tiny_224', '--model-kwargs', *kwargs, '-o', str(out)]
        )
        == 0
    )
    text = out.read_text()
    start = text.index('id="boatvit-data">') + len('id="boatvit-data">')
    data = json.loads(text[start : text.index('</script>', start)])
    assert [layer['name'] for layer in data['layers']] == [f'layers.{i}.blocks.0' for i in range(4)]
    assert [len(layer['regions']) for layer in data['layers']] == [2, 2, 2, 1]
    assert [layer['grid'] for layer in data['layers']] == [[56, 56], [28, 28], [14, 14], [7, 7]]
    (image,) = data['images']
    assert image['top'] == []  # an untrained model has no classifier
    for layer, slots in zip(data['layers'], image['slots']):
        assert len(slots) == layer['heads'] == 2
        assert all(sorted(head) == list(range(layer['grid'][0] * layer['grid'][1])) for head in slots)
