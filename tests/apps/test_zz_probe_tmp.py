import unittest, torch
from berdiff.apps.train_speed import measure
class T(unittest.TestCase):
    def test_a(self):
        measure("diffusion", "tiny", "legacy", batch_size=2, size=16, warmup=1, iterations=1, num_workers=0)
