"""Multi-class object co-segmentation with self- and mutual attention (the thesis method)."""
