"""The six full-size models, each built once per test session (the base ones take seconds)."""

import json
from functools import lru_cache
from pathlib import Path

import timm

import boatvit  # noqa: F401  (registers the models)

REFERENCE_PARAMS = {
    'boat_swin_tiny_224': 30_265_186,
    'boat_swin_small_224': 55_158_898,
    'boat_swin_base_224': 97_612_960,
    'boat_cswin_tiny_224': 26_390_952,
    'boat_cswin_small_224': 40_112_488,
    'boat_cswin_base_224': 89_628_712,
}
# every key and shape of the six reference state dicts, in order (the converter's ground truth)
MANIFEST = json.loads((Path(__file__).parent / 'fixtures' / 'reference_state_dict_manifest.json').read_text())['models']
# our names -> the manifest's
MANIFEST_NAMES = {
    name: name.replace('_224', '').replace('_tiny', '_t').replace('_small', '_s').replace('_base', '_b')
    for name in REFERENCE_PARAMS
}


@lru_cache(maxsize=None)
def full_size_model(name):
    return timm.create_model(name)
