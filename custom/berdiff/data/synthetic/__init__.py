# SPDX-License-Identifier: Apache-2.0
# Copyright (c) berdiff contributors
"""
Synthetic BraTS-like demo data: skull-stripped four-modality brain volumes (:data:`berdiff.utils.MODALITIES`) with
(optional) tumours. Anatomy comes from the MNI ICBM152 2009a template shipped inside the nilearn wheel
(:mod:`.template`); each subject is deformed, rendered and corrupted with MONAI transforms (:mod:`.subjects`), given a
tumour in a share of the subjects (:mod:`.tumour`) and written all-or-nothing (:mod:`.demo_data`). See
``docs/demo_data.md``.
"""

from __future__ import annotations

from berdiff.data.synthetic.demo_data import SegDType, make_demo_data
from berdiff.data.synthetic.subjects import synthesize_subject
from berdiff.data.synthetic.template import TemplateGrid, load_template
from berdiff.data.synthetic.tumour import LABELS

__all__ = ["LABELS", "SegDType", "TemplateGrid", "load_template", "make_demo_data", "synthesize_subject"]
