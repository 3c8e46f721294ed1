# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""Every bundle's configs/metadata.json: the zoo's required files and output labels, and (when the schema file is
given in the environment variable BERDIFF_META_SCHEMA, e.g. by `make test SCHEMA=...`) the metadata schema."""

from __future__ import annotations

import glob
import json
import os
import unittest

from parameterized import parameterized

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
#: a local copy of meta_schema_20240725.json (MONAI-extra-test-data releases); not part of the repository
SCHEMA = os.environ.get("BERDIFF_META_SCHEMA", "")
METADATA = sorted(glob.glob(os.path.join(ROOT, "bundles", "*", "configs", "metadata.json")))


class TestBundleMetadata(unittest.TestCase):
    @parameterized.expand([(os.path.basename(os.path.dirname(os.path.dirname(m))), m) for m in METADATA])
    def test_metadata_and_bundle_files(self, name, path):
        self.assertNotIn("detection", name, "MONAI Label derives the task type from the folder name")
        with open(path) as f:
            meta = json.load(f)
        self.assertIn(meta["version"], meta["changelog"])
        pred = meta["network_data_format"]["outputs"]["pred"]
        self.assertEqual(pred["channel_def"], {"0": "background", "1": "anomaly"})
        self.assertIn("image", meta["network_data_format"]["inputs"])
        for bundle_file in ("LICENSE", "docs/README.md", "docs/data_license.txt", "configs/logging.conf"):
            self.assertTrue(os.path.isfile(os.path.join(ROOT, "bundles", name, bundle_file)), bundle_file)

    @parameterized.expand([(os.path.basename(os.path.dirname(os.path.dirname(m))), m) for m in METADATA])
    def test_metadata_valid_against_schema(self, name, path):
        if not os.path.isfile(SCHEMA):
            self.skipTest("set BERDIFF_META_SCHEMA to a local meta_schema_20240725.json to validate the metadata")
        import jsonschema

        with open(SCHEMA) as f:
            schema = json.load(f)
        with open(path) as f:
            jsonschema.validate(json.load(f), schema)


if __name__ == "__main__":
    unittest.main()
