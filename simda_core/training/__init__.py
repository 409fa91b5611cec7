"""How adapters train: the denoising loss and optimiser (``trainer``), clips and their sampling
(``video_data``), super-resolution degradations and quality measures, and the collection trainer
(``collection``) behind ``scripts/train_simda.py``."""
