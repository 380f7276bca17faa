"""DeepCO3 instance co-segmentation by co-peak search (CVPR 2019)."""
