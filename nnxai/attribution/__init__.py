"""Attribution methods over nnU-Net's sliding window: input gradients, SmoothGrad, Grad-CAM++."""
