"""mmlearn: a PyTorch Lightning framework for comparing supervised multi-modal learning strategies.

The strategies (:mod:`mmlearn.strategies`) share DataModules (:mod:`mmlearn.data`), encoders
(:mod:`mmlearn.encoders`), fusions and metrics, so every strategy is trained under the same
conditions. ``mmlearn fit|validate|test|predict`` is a LightningCLI; see :mod:`mmlearn.cli`.
"""

from __future__ import annotations

__version__ = "0.1.0"

from mmlearn.batch import MultimodalBatch

__all__ = ["MultimodalBatch", "__version__"]
