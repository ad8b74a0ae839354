"""dia: gradient inversion through dropout (IG, WIIG and the Dropout Inversion Attack)."""

__version__ = "0.1.0"
