# Copyright (c) berdiff contributors
# Licensed under the Apache License, Version 2.0 (the "License").
from __future__ import annotations

import glob
import json
import os
import unittest

from parameterized import parameterized

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCHEMA = os.path.join(os.path.dirname(ROOT), "shared", "schemas", "meta_schema_20240725.json")
METADATA = sorted(glob.glob(os.path.join(ROOT, "bundles", "*", "configs", "metadata.json")))


class TestBundleMetadata(unittest.TestCase):
    @parameterized.expand([(os.path.basename(os.path.dirname(os.path.dirname(m))), m) for m in METADATA])
    def test_metadata_valid_against_schema(self, name, path):
        self.assertNotIn("detection", name, "MONAI Label derives the task type from the folder name")
        if not os.path.isfile(SCHEMA):
            self.skipTest(f"schema not found at {SCHEMA} (../shared/schemas is absent)")
        import jsonschema

        with open(SCHEMA) as f:
            schema = json.load(f)
        with open(path) as f:
            meta = json.load(f)
        jsonschema.validate(meta, schema)
        self.assertIn(meta["version"], meta["changelog"])
        pred = meta["network_data_format"]["outputs"]["pred"]
        self.assertEqual(pred["channel_def"], {"0": "background", "1": "anomaly"})
        self.assertIn("image", meta["network_data_format"]["inputs"])
        for bundle_file in ("LICENSE", "docs/README.md", "docs/data_license.txt", "configs/logging.conf"):
            self.assertTrue(os.path.isfile(os.path.join(ROOT, "bundles", name, bundle_file)), bundle_file)


if __name__ == "__main__":
    unittest.main()
