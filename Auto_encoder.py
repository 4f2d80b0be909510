"""The AE_CRC convolutional autoencoder: 256x256 RGB tile -> 512x8x8 latent map -> 256x256 RGB tile.

Layer layout and state-dict keys (encoder.0.weight ... decoder.15.bias) match the reference model,
so weights move between the two projects. Unlike the reference, the network takes images in [0, 1],
applies the ImageNet normalisation itself and returns [0, 1], so training targets, evaluation and
feature extraction all see the same tensors.
"""
import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DOWNSAMPLING = 32  # five stride-2 steps: image sides must be multiples of this


def fits(side):
    """Whether the network takes images with sides of side pixels: a positive multiple of DOWNSAMPLING."""
    return side >= DOWNSAMPLING and side % DOWNSAMPLING == 0


def _down(c_in, c_out, stride):
    return [nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1), nn.BatchNorm2d(c_out), nn.LeakyReLU()]


def _up(c_in, c_out):
    return [nn.ConvTranspose2d(c_in, c_out, kernel_size=3, stride=2, padding=1, output_padding=1),
            nn.BatchNorm2d(c_out), nn.LeakyReLU()]


class AutoEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        # Not persistent: the state dict keeps exactly the reference's keys.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.encoder = nn.Sequential(
            *_down(3, 32, 1), *_down(32, 64, 2), *_down(64, 128, 2),
            *_down(128, 256, 2), *_down(256, 512, 2), *_down(512, 512, 2),
        )
        self.decoder = nn.Sequential(
            *_up(512, 512), *_up(512, 256), *_up(256, 128), *_up(128, 64), *_up(64, 32),
            nn.Conv2d(32, 3, kernel_size=3, padding=1), nn.Sigmoid(),
        )

    def encode(self, x):
        """Images in [0, 1], N x 3 x H x W -> latent map N x 512 x H/32 x W/32."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape N x 3 x H x W, got {tuple(x.shape)}")
        height, width = x.shape[-2:]
        if not (fits(height) and fits(width)):
            raise ValueError(f"image sides must be multiples of {DOWNSAMPLING}, got {height} x {width}; "
                             f"set tile_size to one such as 256")
        return self.encoder((x - self.mean) / self.std)

    def embed(self, x):
        """Images in [0, 1] -> one 512-d feature per image: the latent map's global average (DeepCluster++)."""
        return self.encode(x).mean(dim=(2, 3))

    def forward(self, x):
        """Images in [0, 1] -> reconstructions in [0, 1], same shape."""
        return self.decoder(self.encode(x))


def for_inference(model):
    """An inference copy of model (eval mode): every BatchNorm folded into the convolution before it, its
    eval-mode statistics becoming that convolution's weights and bias, and the activations computed in
    place. The same function, faster. Its state dict lacks the BatchNorm keys: save
    the original model, never this copy."""
    folded = copy.deepcopy(model).eval()
    for stack in (folded.encoder, folded.decoder):
        for i in range(len(stack) - 1):
            layer, norm = stack[i], stack[i + 1]
            if isinstance(norm, nn.BatchNorm2d) and isinstance(layer, (nn.Conv2d, nn.ConvTranspose2d)):
                stack[i] = fuse_conv_bn_eval(layer, norm, transpose=isinstance(layer, nn.ConvTranspose2d))
                stack[i + 1] = nn.Identity()
    return activations_in_place(folded)


def activations_in_place(model):
    """model with each LeakyReLU overwriting the tensor it is given (the BatchNorm or convolution output,
    which nothing else reads; BatchNorm's backward reads its input, not its output): the same values and
    gradients, one activation-sized buffer and memory pass fewer per layer. The state dict is unchanged."""
    for layer in model.modules():
        if isinstance(layer, nn.LeakyReLU):
            layer.inplace = True
    return model
