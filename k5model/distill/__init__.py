"""Distillation of the video models (report §6.5, Figure 20): CFG distillation (100 → 50 NFE), trajectory-segmented
consistency distillation to 16 NFE, adversarial post-training of the 16-NFE model; pure PyTorch."""
