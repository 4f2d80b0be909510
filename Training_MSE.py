"""Train the autoencoder with the MSE loss. Settings: Config.py, or --key=value on the command line.

    python Training_MSE.py --num_epochs=3 --folder_path_train=my_tiles
"""
from core.cli import training_main

if __name__ == "__main__":
    training_main("mse")
