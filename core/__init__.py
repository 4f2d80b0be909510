import os

# OpenMP threads that wait for work sleep instead of spinning. Spinning threads hold the cores that their
# sibling threads need whenever a CPU is shared or has fewer free cores than torch starts threads, and a
# training step then takes several times longer; set before any module of the package imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
