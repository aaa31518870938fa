"""ctlesion: lung-lesion instance segmentation and slice classification for chest CT.

The Ter-Sarkisov model family (COVID-CT-Mask-Net, Single-Shot Model, Affinity,
Attention/LSTM) rebuilt by composing stock ``torchvision.models.detection`` modules.
"""

__version__ = "0.1.0"
