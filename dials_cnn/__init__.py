"""dials_cnn: screen serial-crystallography stills with a convolutional neural network.

Importing the package has no side effects; the pieces live in their own modules.
"""

__version__ = "0.1.0"
