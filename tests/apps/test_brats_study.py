# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
from __future__ import annotations

import io
import json
import unittest
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import torch

from berdiff.apps.brats_study import GRID_MAPS, brats_study, default_map_rules, load_subject_volumes
from berdiff.networks import autoencoder_from_preset, denoiser_from_preset
from berdiff.training import export_pipeline
from tests.utils import TempDirMixin

SIZE = 16


def _prepared(root: Path) -> Path:
    """A tiny prepare_brats-like folder: 2 validation subjects, 6 slices each, a bright FLAIR box in slices 2..4."""
    rng = np.random.default_rng(0)
    prep = root / "prep"
    lists: dict = {"training": [], "validation": [], "training_diseased": [], "validation_diseased": []}
    for s in ("subj_a", "subj_b"):
        (prep / "slices" / s).mkdir(parents=True)
        for z in range(6):
            img = np.zeros((4, SIZE, SIZE), np.float32)
            img[:, 2:14, 2:14] = 0.4 + 0.1 * rng.random((4, 12, 12))
            rel = f"slices/{s}/{s}_z{z:03d}"
            entry = {"image": rel + "_image.npy", "subject": s, "slice": z}
            if 2 <= z <= 4:
                img[3, 5:9, 6:10] = 0.95  # hyperintense on FLAIR
                lab = np.zeros((1, SIZE, SIZE), np.uint8)
                lab[0, 5:9, 6:10] = 1
                np.save(prep / (rel + "_label.npy"), lab)
                entry["label"] = rel + "_label.npy"
                lists["validation_diseased"].append(entry)
            else:
                lists["validation"].append(entry)
            np.save(prep / (rel + "_image.npy"), img.astype(np.float16))
    (prep / "datalist.json").write_text(json.dumps(lists))
    return prep


class TestBratsStudy(TempDirMixin, unittest.TestCase):
    def test_volumes_and_rules(self):
        prep = _prepared(Path(self.tmp))
        vols = load_subject_volumes(prep, "validation", 1, 5)
        self.assertEqual(sorted(vols), ["subj_a", "subj_b"])
        self.assertEqual(vols["subj_a"]["image"].shape, (4, 4, SIZE, SIZE))
        self.assertEqual(vols["subj_a"]["slices"].tolist(), [1, 2, 3, 4])
        self.assertEqual(vols["subj_a"]["label"].sum(), 3 * 16)
        with self.assertRaisesRegex(ValueError, "no validation slice"):
            load_subject_volumes(prep, "validation", 50, 60)
        rules = default_map_rules({"residual_sign": "positive", "residual_channels": ["flair"],
                                   "intensity_prior": "flair", "latent_weighting": "none"})
        self.assertEqual(rules["default"], {"sign": "positive", "channels": ["flair"], "prior": "flair",
                                            "power": 1.0, "floor": 0.0, "weighting": None})
        self.assertIsNone(rules["learned"]["prior"])
        self.assertEqual(rules["paper"], {"sign": "both", "channels": "all", "prior": None, "weighting": None})
        self.assertEqual(rules["autoencoder_default"]["source"], "autoencoder")

    def test_end_to_end_with_tiny_weights(self):
        root = Path(self.tmp)
        prep = _prepared(root)
        torch.manual_seed(0)
        ae = autoencoder_from_preset("tiny", in_channels=4)
        export_pipeline(ae, denoiser_from_preset("tiny", latent_channels=ae.latent_channels),
                        str(root / "model" / "models" / "model.pt"), preset="tiny", spatial_size=SIZE)
        stage_one = root / "autoencoder_best.pt"
        torch.save(ae.state_dict(), stage_one)
        with redirect_stdout(io.StringIO()) as buf:
            res = brats_study(str(prep), str(root / "model"), str(root / "out"), noise_levels=[4, 2],
                              prob_thresholds=[0.5], num_inference_steps=[2], slice_start=0, slice_stop=6,
                              n_resamples=200, autoencoders=str(stage_one), autoencoder_preset="tiny")
        self.assertIn("brats_study: model L=4 P=0.5 K=2", buf.getvalue())
        run = res["runs"][0]
        flair = run["maps"]["input_flair"]["protocol_b"]
        self.assertGreater(flair["auroc"]["mean"], 0.9)  # the box is the brightest FLAIR region
        for name in ("default", "paper", "learned", "autoencoder_default", "latent_confident_change", "input_t1"):
            self.assertIn(name, run["maps"])
        self.assertEqual(run["comparisons"]["paper"]["input_flair"]["volume_auprc"]["n"], 2)
        # the stage-1 weights alone give the model's autoencoder-only maps (the same autoencoder)
        ae_run = res["autoencoder_runs"][0]
        self.assertEqual(sorted(ae_run["maps"]), sorted([n for n in run["maps"] if n.startswith("autoencoder_")]
                                                        + ["input_flair"]))
        self.assertAlmostEqual(ae_run["maps"]["autoencoder_default"]["protocol_b"]["auprc"]["mean"],
                               run["maps"]["autoencoder_default"]["protocol_b"]["auprc"]["mean"])
        # the rest of the grid scores the main maps only
        self.assertEqual(res["runs"][1]["noise_level"], 2)
        self.assertEqual(sorted(res["runs"][1]["maps"]), sorted([*GRID_MAPS, "latent_confident_change", "input_flair"]))
        md = (root / "out" / "study.md").read_text()
        self.assertIn("| input_flair |", md)
        saved = json.loads((root / "out" / "study.json").read_text())
        self.assertEqual(saved["subjects"], ["subj_a", "subj_b"])
        with self.assertRaisesRegex(FileNotFoundError, "no trained model"):
            brats_study(str(prep), str(root / "missing"), str(root / "out2"))


if __name__ == "__main__":
    unittest.main()
