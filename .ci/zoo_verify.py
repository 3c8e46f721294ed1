# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Runs the MONAI model zoo's own bundle check (``ci/verify_bundle.py`` of a Project-MONAI/model-zoo checkout) on built
bundles (``make bundles``), offline, with the exclusions these generative bundles need (each stated below and in the
bundle READMEs). Usage::

    python .ci/zoo_verify.py --zoo <model-zoo checkout> --dist dist --schema meta_schema_20240725.json --mode min
    python .ci/zoo_verify.py --zoo <model-zoo checkout> --dist dist --schema meta_schema_20240725.json --mode full

Each bundle is copied into a temporary ``models`` folder with an empty ``model_info.json`` (new bundles), and the
metadata schema is placed where ``verify_metadata`` would download it (``eval/schema.json``), so nothing is fetched.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

#: bundle -> {zoo exclusion list: reason}
EXCLUSIONS: dict[str, dict[str, str]] = {
    "brats_mri_bernoulli_anomaly": {
        "exclude_verify_preferred_files_list": "no trained BraTS weights are released yet (train with the bundle's "
        "configs); models/model.pt is therefore absent",
        "exclude_verify_shape_list": "metadata describes the 3D volumes the bundle takes (slices fed by SliceInferer); "
        "network_def is the 2D slice pipeline and returns 6 channels (anomaly map, latent flip map, 4-channel "
        "reconstruction), of which pred is the first",
        "exclude_verify_torchscript_list": "network_def is the stochastic masked-diffusion sampler (Python loop over "
        "timesteps, per-sample generators, empty-slice skip): not scriptable, and a traced copy would freeze one "
        "branch (wrong maps); TorchScript export is unsupported (MONAI's DiffusionModelUNet attention blocks do not script either)",
    },
    "ixi_t1_bernoulli_anomaly": {
        "exclude_verify_torchscript_list": "network_def is the stochastic masked-diffusion sampler (see the brain "
        "bundle); TorchScript export is unsupported",
    },
    "oct_bernoulli_anomaly": {
        "exclude_verify_preferred_files_list": "no weights are released (the OCT scans it was measured on have no "
        "stated licence; train with the bundle's configs); models/model.pt is therefore absent",
        "exclude_verify_shape_list": "network_def returns the anomaly map followed by the other maps it scores "
        "(output_keys: 8 channels), of which pred is the first",
        "exclude_verify_torchscript_list": "network_def is the stochastic masked-diffusion sampler (see the brain "
        "bundle); TorchScript export is unsupported",
    },
}

RUNNER = """
import sys
zoo_ci, bundle, models, mode, exclusions = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
sys.path.insert(0, zoo_ci)
import bundle_custom_data
for name in exclusions:
    getattr(bundle_custom_data, name).append(bundle)  # the same list objects verify_bundle imports
import verify_bundle
verify_bundle.verify(bundle, models, mode)
print(f"verify_bundle -m {mode}: {bundle} passed")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--zoo", required=True, help="a Project-MONAI/model-zoo checkout (its ci/ folder is used)")
    parser.add_argument("--dist", default="dist", help="folder of built bundles")
    parser.add_argument("--schema", required=True, help="local copy of meta_schema_20240725.json")
    parser.add_argument("--mode", default="min", choices=["min", "full"])
    parser.add_argument("--bundles", nargs="*", default=list(EXCLUSIONS))
    args = parser.parse_args()
    zoo_ci = os.path.abspath(os.path.join(args.zoo, "ci"))
    if not os.path.isfile(os.path.join(zoo_ci, "verify_bundle.py")):
        raise SystemExit(f"error: {zoo_ci}/verify_bundle.py not found")
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        models = os.path.join(tmp, "models")
        os.makedirs(models)
        with open(os.path.join(models, "model_info.json"), "w") as f:
            json.dump({}, f)
        for bundle in args.bundles:
            src = os.path.join(args.dist, bundle)
            if not os.path.isdir(src):
                raise SystemExit(f"error: {src} not found: run `make bundles` first")
            dst = os.path.join(models, bundle)
            shutil.copytree(src, dst)
            os.makedirs(os.path.join(dst, "eval"), exist_ok=True)
            shutil.copy(args.schema, os.path.join(dst, "eval", "schema.json"))
            excl = EXCLUSIONS.get(bundle, {}) if args.mode == "full" else {
                k: v for k, v in EXCLUSIONS.get(bundle, {}).items() if k == "exclude_verify_preferred_files_list"
            }
            for name, why in excl.items():
                print(f"{bundle}: {name}: {why}")
            # run from a scratch folder: verify_bundle writes model.pt/verify_model.ts relative to cwd in places
            proc = subprocess.run([sys.executable, "-c", RUNNER, zoo_ci, bundle, models, args.mode, *excl], cwd=tmp)
            if proc.returncode:
                failed.append(bundle)
    if failed:
        raise SystemExit(f"error: verify_bundle -m {args.mode} failed for {failed}")


if __name__ == "__main__":
    main()
