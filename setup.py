"""ovla-jax: OpenVLA in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="ovla-jax",
    version="0.1.0",
    description="OpenVLA (vision-language-action policy) in JAX/Flax, with HF PyTorch weight conversion",
    # configs/ is a package too, so a config file anywhere can build on configs.train.* without PYTHONPATH.
    packages=find_packages(include=["ovla_jax", "ovla_jax.*", "configs", "configs.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.4.30",
        "flax>=0.8",
        "optax",
        "orbax-checkpoint",
        "ml-collections",
        "absl-py",
        "numpy",
        "ml_dtypes",
        "safetensors>=0.4",
        "tokenizers>=0.15",  # HF tokenizer dirs (tokenizer.json) without transformers / PyTorch
        "tqdm",
        "tensorflow-cpu",
        "tensorflow-datasets",
        "tensorboard",  # tf.summary event files (tensorflow-cpu does not pull it in)
        "matplotlib",  # the demo's loss curve and rollout filmstrip
        "importlib_resources",
        "pyyaml",  # dataset spec files
    ],
    extras_require={
        # PyTorch reference for parity tests and export checks; never imported by the package itself.
        "torch": ["torch>=2.1", "torchvision", "timm>=1.0", "transformers>=4.40"],
        "dev": ["pytest", "pytest-timeout", "pyyaml", "requests",
                # openpi's client for the serving tests (install it with --no-deps: it pins numpy < 2, which
                # JAX does not allow; its own needs are listed here)
                "dm-tree", "pillow", "typing-extensions"],
        # ovla-jax serve: an ASGI app (Starlette) on uvicorn; json_numpy and msgpack for the two protocols.
        "serve": ["starlette>=0.40", "uvicorn[standard]>=0.30", "json-numpy>=2.0", "msgpack>=1.0", "websockets>=12"],
        # ovla-jax import: LeRobot datasets (parquet + mp4 videos) and HDF5 episodes (robomimic / ACT layouts).
        "import": ["pyarrow", "av", "h5py"],
        # libtpu: training on TPU VMs, and ahead-of-time compiles for TPU slices on any host (ovla-jax compile).
        "tpu": ["jax[tpu]"],
        # CUDA 12 wheels of jaxlib for GPU training (launch/slurm_gpu.sbatch).
        "gpu": ["jax[cuda12]"],
    },
    entry_points={"console_scripts": ["ovla-jax=ovla_jax.cli:main"]},
)
