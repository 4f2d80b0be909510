"""Evaluate the MSE-trained autoencoder: side-by-side PNGs and a metrics workbook for every tile.

    python Evaluation_MSE.py --folder_path_test=my_tiles --model_path_mse=checkpoints/MSE/Final_Model_AE_MSE.pth
"""
from core.cli import evaluation_main

if __name__ == "__main__":
    evaluation_main("mse")
