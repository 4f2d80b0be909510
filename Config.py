"""Settings shared by every script. Edit them here, or override any one per run:

    python Training_SSIM.py --num_epochs=3 --folder_path_train=my_tiles

Relative paths are relative to the folder you run the scripts from.
"""

#------------------------------------------------------------------
# System
#------------------------------------------------------------------
GPUs = "0"                    # GPU ids: "0", "2,3", or "cpu"; without CUDA the scripts use the CPU
num_workers = 4               # data-loading processes, at most one per CPU (0 = load in the main process)
seed = 0                      # random seed for shuffling, augmentation, the validation split and Select_Tiles.py's sampling
mixed_precision = "auto"      # "auto": bf16/fp16 on GPUs, bf16 training on CPUs with native bf16; "bf16"; "off" = fp32
keep_freed_memory = "auto"    # glibc malloc keeps freed memory for reuse (faster on CPUs): "auto" (on without CUDA), True, False

#------------------------------------------------------------------
# Model training (MSE / SSIM)
#------------------------------------------------------------------
folder_path_train = "training_tiles"   # folder of training tiles, searched recursively
tile_size = 256               # side in pixels every image is resized to (a multiple of 32)
train_crop_size = 0           # random square crop of each tile for training, pixels (0 = whole tile)
num_epochs = 100              # passes over the training tiles
batch_size_train = 64         # tiles per optimisation step
learning_rate = 1e-4          # Adam step size
weight_decay = 1e-5           # Adam L2 penalty
l1_loss_weight = 0.0          # add this times the mean absolute error to the training loss (0 = MSE or SSIM alone)
lr_schedule = "constant"      # "constant", or "cosine" (decay to 1% of learning_rate by the last epoch)
augment = True                # random rotation, flips, affine, colour jitter and blur, applied batched on the device
val_fraction = 0.05           # share of training tiles held out for per-epoch validation (0 = none)
sync_batchnorm = False        # multi-GPU: synchronise BatchNorm statistics across GPUs
compile_model = False         # torch.compile the model (faster on recent GPUs after a slow first epoch)
cache_tiles = "auto"          # keep decoded training tiles in memory as uint8: "auto" (when they fit), True, False
finite_check_interval = 50    # steps between checks that the loss is finite (each waits for the GPU once; also at epoch end)

model_saved_location_mse = "checkpoints/MSE"    # folder for MSE-loss checkpoints
model_saved_location_ssim = "checkpoints/SSIM"  # folder for SSIM-loss checkpoints
save_interval = 5             # write Model_AE_epoch_NNN.pth every N epochs
keep_checkpoints = 3          # keep the newest N Model_AE_epoch_NNN.pth, delete older ones once a newer one is saved (0 = keep all)
resume = True                 # continue from the newest checkpoint in the checkpoint folder

training_loss_file_mse = "training_loss_mse.csv"    # per-epoch loss log of MSE training
training_loss_file_ssim = "training_loss_ssim.csv"  # per-epoch loss log of SSIM training

#------------------------------------------------------------------
# Model evaluation (MSE / SSIM)
#------------------------------------------------------------------
folder_path_test = "input_images"  # folder of tiles to reconstruct, searched recursively
batch_size_test = 32          # tiles per forward pass during evaluation

model_path_mse = "sample_models/model_auto_encoder_reconstruction_mse.pth"    # model evaluated by Evaluation_MSE.py
model_path_ssim = "sample_models/model_auto_encoder_reconstruction_ssim.pth"  # model evaluated by Evaluation_SSIM.py

recon_output_mse = "reconstructed_images/MSE/"    # side-by-side PNGs of Evaluation_MSE.py
recon_output_ssim = "reconstructed_images/SSIM/"  # side-by-side PNGs of Evaluation_SSIM.py

reconstruction_metrics_mse = "reconstructed_images/validation_reconstruction_metrics_mse.xlsx"    # workbook of Evaluation_MSE.py
reconstruction_metrics_ssim = "reconstructed_images/validation_reconstruction_metrics_ssim.xlsx"  # workbook of Evaluation_SSIM.py

#------------------------------------------------------------------
# Cutting a slide into tiles (Prepare_Tiles.py)
#------------------------------------------------------------------
slide_path = "sample_slides/cmu_small_region.svs"  # whole-slide file (SVS, NDPI, MRXS, TIFF ...) or PNG/JPEG/TIFF image to cut
tiles_output_folder = "training_tiles"  # where Prepare_Tiles.py writes <slide>_x<X>_y<Y>.png tiles
tile_stride = 256                   # pixels at target_mpp between neighbouring tile origins (below tile_size = overlapping tiles)
target_mpp = 0.5                    # microns per pixel of the tiles (0.5 = 20x, 0.25 = 40x), read from the best pyramid level
slide_mpp = 0.0                     # microns per pixel of the slide at full resolution (0 = as the file records it)
tissue_fraction = 0.5               # keep a tile when at least this fraction of its area is tissue in the slide's tissue mask
background_gray = 220               # tissue mask: a pixel whose mean of R, G, B (0-255) is at least this is glass background
exclude_tiles_in = "input_images"   # held-out tiles named <slide>_x<X>_y<Y>.png: their areas of that slide are not cut ("" = none)

#------------------------------------------------------------------
# Encoder features for DeepCluster++ (Extract_Features.py)
#------------------------------------------------------------------
folder_path_features = "input_images"      # tiles to describe, searched recursively
features_output = "features/features.csv"  # CSV Feature_1..Feature_512,File_Path; .npy, paths and PCA plot beside it

folder_path_slides = ""       # whole slides to describe: one slide, a folder (recursive) or a .txt list ("" = the tile folder above)
features_folder = "features"  # slide mode: <slide>.h5, <slide>_tiles.png and slides_summary.csv, slide subfolders mirrored
tile_qc = False               # slide mode: also run the decoder and store each tile's reconstruction MSE and SSIM
features_csv = False          # slide mode: also write <slide>.csv (Feature_1..Feature_512,File_Path) beside the .h5

#------------------------------------------------------------------
# Representative tiles per slide, DeepCluster++'s selection (Select_Tiles.py)
#------------------------------------------------------------------
selection_folder = "selected_tiles" # where Select_Tiles.py writes each slide's table, selected tiles and picture
select_pca_dims = 256               # principal components kept before k-means (slides with fewer tiles skip PCA)
select_clusters = 0                 # k-means clusters per slide (0 = ceil(sqrt(tiles)))
select_distance_groups = 5          # equal-size groups per cluster by distance to its centre
select_fraction = 0.2               # share of each distance group selected (at least one tile per group)
select_qc = 0.0                     # leave out tiles whose reconstruction error is an outlier: robust z-score threshold (0 = off)
