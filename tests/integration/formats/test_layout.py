"""layout.py on a local folder and on the S3 test server: outputs are never inputs.

A listing of images that holds a run (inputs.json or run.json beside masks/ or scores/), a model (spade.json) or an
evaluation, or lies inside one, is found, and refuse_outputs names it; a folder of images with a file of the same name
of its own is not taken for one. fit, add and score refusing such listings on Ray are in tests/integration/engine/test_add.py.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from spade_batch.formats import storage
from spade_batch.formats.layout import EvaluationOutputs, ModelLayout, Outputs, find_output, part_name, refuse_outputs
from spade_batch.formats.manifest import build_manifest, is_manifest_file
from spade_batch.formats.score_table import ScoreRow, write_scores
from tests.integration.conftest import StorageRoot


def png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_run(out: str, options: storage.StorageOptions) -> Outputs:
    """A run's files as score writes them: inputs.json first, a mask, then its scores part."""
    outputs = Outputs(out)
    storage.write_text(outputs.inputs_json, json.dumps({"images": "x"}), options)
    storage.write_bytes(outputs.mask("a.png"), png(), options)
    write_scores(storage.join(outputs.scores, part_name(["a.png"])), [ScoreRow(id="a.png", uri="/n/a.png", mask_uri=outputs.mask("a.png"))],
                 options)
    return outputs


def refusal(source: str, options: storage.StorageOptions) -> str:
    manifest = build_manifest(source, options)
    with pytest.raises(ValueError) as raised:
        refuse_outputs(f"--images {source}", manifest, not is_manifest_file(source), "add", options)
    return str(raised.value)


@pytest.fixture
def tree(storage_root: StorageRoot) -> str:
    """root/data/good/*.png (normal images), root/data/night/out (a run), root/model (a model card),
    root/eval (an evaluation: metrics.json, a figure, and its run in scores/)."""
    root, options = storage_root.base, storage_root.options
    for name in ("good/000.png", "good/001.png", "night/000.png"):
        storage.write_bytes(storage.join(root, "data", name), png(), options)
    write_run(storage.join(root, "data", "night", "out"), options)
    storage.write_text(ModelLayout(storage.join(root, "model")).card, "{}", options)
    storage.write_bytes(storage.join(root, "model", "train", "000.png"), png(), options)
    evaluation = EvaluationOutputs(storage.join(root, "eval"))
    storage.write_text(evaluation.metrics_json, "{}", options)
    storage.write_bytes(evaluation.roc, png(), options)
    write_run(evaluation.run.root, options)
    return root


def test_a_listing_holding_inside_or_being_an_output_is_refused_naming_it(tree: str, storage_root: StorageRoot) -> None:
    options = storage_root.options
    data, out = storage.join(tree, "data"), storage.join(tree, "data", "night", "out")
    expected = {
        data: f"--images {data} holds a run written by spade-batch ({storage.normalize(out, options)})",
        out: f"--images {out} is a run written by spade-batch ({storage.normalize(out, options)})",
        storage.join(out, "masks"): f"--images {out}/masks lies inside a run written by spade-batch ({storage.normalize(out, options)})",
        storage.join(tree, "model", "train"): "lies inside a model written by spade-batch",
        storage.join(tree, "eval"): "is an evaluation written by spade-batch",
        storage.join(tree, "data", "*", "*.png"): "holds a run written by spade-batch",
    }
    for source, message in expected.items():
        text = refusal(source, options)
        assert message in text and "its files are outputs, never normal images; give add a folder of images only" in text

    masks = storage.join(tree, "masks.txt")
    storage.write_text(masks, storage.normalize(Outputs(out).mask("a.png"), options) + "\n", options)
    assert f"--images {masks} lists images inside a run written by spade-batch" in refusal(masks, options)


def test_images_beside_no_output_pass_and_a_file_named_like_ones_own_is_not_an_output(tree: str, storage_root: StorageRoot) -> None:
    options = storage_root.options
    good = storage.join(tree, "data", "good")
    storage.write_text(storage.join(good, "inputs.json"), "{}", options)  # a file of the user's own, beside no masks/ or scores/
    storage.write_text(storage.join(good, "run.json"), "{}", options)
    listed = storage.join(tree, "good.txt")
    storage.write_text(listed, "\n".join(storage.join(good, f"00{n}.png") for n in range(2)), options)
    for source in (good, storage.join(good, "*.png"), listed):
        manifest = build_manifest(source, options)
        assert len(manifest) == 2 and find_output(manifest, not is_manifest_file(source), options) is None
        refuse_outputs(source, manifest, not is_manifest_file(source), "fit", options)
