# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Helpers of ``.ci/test_monailabel.sh``.

``prepare`` (run with berdiff installed): puts a tiny random model and its ``model.json`` into a built bundle, sets
test-sized inference settings in the bundle copy's ``configs/inference.yaml`` (tiny preset, 32 x 32 slices, L = 4,
K = 2) and writes one 4-channel study ``case0.nii.gz`` with a non-trivial affine.

``check`` (run in the MONAI Label environment, standard library + nibabel): waits for the server, then checks
``/info`` (the model, 3D, labels ``{"anomaly": 1}``) and ``/infer`` (uint8 0/1 mask by default, float map with
``binarize_output: false``; both on the study's grid).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

import numpy as np

SHAPE = (30, 28, 6)
AFFINE = np.array([[1.2, 0, 0, -10.0], [0, 0.9, 0, 5.0], [0, 0, 2.5, 3.0], [0, 0, 0, 1.0]])


def prepare(bundle: str, studies: str) -> None:
    import nibabel as nib
    import torch
    import yaml

    from berdiff.networks import autoencoder_from_preset, denoiser_from_preset
    from berdiff.training import export_pipeline

    torch.manual_seed(0)
    ae = autoencoder_from_preset("tiny", in_channels=4)
    # models/model.pt and its model.json, as the training export writes them
    export_pipeline(ae, denoiser_from_preset("tiny", latent_channels=ae.latent_channels),
                    os.path.join(bundle, "models", "model.pt"), preset="tiny", spatial_size=32)
    # test-sized settings (MONAI Label cannot override config values): the network size matches the weights
    cfg_path = os.path.join(bundle, "configs", "inference.yaml")
    with open(cfg_path) as f:
        cfg = yaml.safe_load(f)
    cfg.update(preset="tiny", spatial_size=[32, 32], noise_level=4, num_inference_steps=2, progress=False)
    with open(cfg_path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    os.makedirs(studies, exist_ok=True)
    rng = np.random.default_rng(0)
    vol = np.zeros(SHAPE + (4,), np.float32)
    vol[5:25, 4:24, 1:5] = rng.random((20, 20, 4, 4)) + 1.0
    nib.save(nib.Nifti1Image(vol, AFFINE), os.path.join(studies, "case0.nii.gz"))


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def _infer(url: str, model: str, image: str, params: dict) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="params"\r\n\r\n{json.dumps(params)}\r\n--{boundary}--\r\n'
    ).encode()
    req = urllib.request.Request(
        f"{url}/infer/{model}?image={image}&output=image",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return r.read(), r.headers.get("content-disposition", "")


def _load(data: bytes, name: str):
    import nibabel as nib

    suffix = ".nii.gz" if data[:2] == b"\x1f\x8b" else ".nii"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "out" + suffix)
        with open(path, "wb") as f:
            f.write(data)
        img = nib.load(path)
        return np.asarray(img.dataobj), img.affine, img.get_data_dtype()


def check(url: str, model: str, studies: str, server_pid: int | None, timeout: float = 900.0) -> None:
    import nibabel as nib

    start = time.time()
    while True:
        if server_pid is not None:
            try:
                os.kill(server_pid, 0)
            except OSError:
                raise SystemExit("error: the MONAI Label server exited during start-up") from None
        try:
            info = _get_json(f"{url}/info/")
            break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.time() - start > timeout:
                raise SystemExit(f"error: no answer from {url}/info/ after {timeout:.0f} s") from None
            time.sleep(3)
    print(f"server up after {time.time() - start:.0f} s")
    models = info.get("models", {})
    if model not in models:
        raise SystemExit(f"error: /info lists models {sorted(models)}, not {model!r}")
    entry = models[model]
    print(f"/info {model}: type={entry.get('type')} dimension={entry.get('dimension')} labels={entry.get('labels')}")
    if entry.get("dimension") != 3:
        raise SystemExit(f"error: dimension {entry.get('dimension')}, expected 3")
    if entry.get("labels") != {"anomaly": 1}:
        raise SystemExit(f"error: labels {entry.get('labels')}, expected {{'anomaly': 1}}")

    ref = nib.load(os.path.join(studies, "case0.nii.gz"))
    for params, kind in (({}, "mask"), ({"binarize_output": False}, "map")):
        t0 = time.time()
        data, disposition = _infer(url, model, "case0", params)
        arr, affine, dtype = _load(data, disposition)
        arr = np.squeeze(arr)
        print(f"/infer {kind}: shape {arr.shape}, dtype {dtype}, range [{arr.min()}, {arr.max()}], {time.time() - t0:.1f} s")
        if arr.shape != ref.shape[:3]:
            raise SystemExit(f"error: {kind} shape {arr.shape}, expected the study's {ref.shape[:3]}")
        if not np.allclose(affine, ref.affine, atol=1e-4):
            raise SystemExit(f"error: {kind} affine\n{affine}\nis not the study's\n{ref.affine}")
        if kind == "mask":
            if dtype != np.uint8 or not set(np.unique(arr).tolist()) <= {0, 1}:
                raise SystemExit(f"error: the mask is not uint8 0/1 (dtype {dtype}, values {np.unique(arr)[:10]})")
        else:
            if not np.issubdtype(dtype, np.floating) or len(np.unique(arr)) <= 2 or arr.min() < 0:
                raise SystemExit(f"error: the map is not a continuous non-negative float map (dtype {dtype})")
    print("monailabel check: passed")


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--bundle", required=True)
    p.add_argument("--studies", required=True)
    c = sub.add_parser("check")
    c.add_argument("--url", required=True)
    c.add_argument("--model", required=True)
    c.add_argument("--studies", required=True)
    c.add_argument("--server_pid", type=int, default=None)
    args = parser.parse_args()
    if args.cmd == "prepare":
        prepare(args.bundle, args.studies)
    else:
        check(args.url, args.model, args.studies, args.server_pid)


if __name__ == "__main__":
    sys.exit(main())
