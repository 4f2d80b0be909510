"""Evaluate the SSIM-trained autoencoder: side-by-side PNGs and a metrics workbook for every tile.

    python Evaluation_SSIM.py --folder_path_test=my_tiles --model_path_ssim=checkpoints/SSIM/Final_Model_AE_SSIM.pth
"""
from core.cli import evaluation_main

if __name__ == "__main__":
    evaluation_main("ssim")
