from setuptools import setup

setup(
    name="cvnets-tiny",
    version="0.2.0",
    description="Config-driven PyTorch training of MobileViT and ResNet on TinyImageNet",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["cvnets", "data", "loss_fn", "optim", "engine", "options", "tools", "utils", "config"],
    # The configs travel with the code (site-packages/config beside options/), so an installed
    # package finds `--common.config-file mobilevit_tiny` the same way a checkout does.
    package_data={"config": ["*.yaml", "*.json", "**/*.yaml", "**/*.json"]},
    install_requires=["torch>=2.1", "torchvision>=0.16", "pyyaml>=6", "numpy", "tqdm", "pillow"],
    extras_require={
        "test": ["pytest>=7", "pytest-xdist", "matplotlib", "onnx", "onnxscript", "onnxruntime", "timm", "tensorboard", "submitit",
                 "transformers", "safetensors", "wandb", "mlflow"],
        "export": ["onnx", "onnxscript", "onnxruntime"],
        "plots": ["matplotlib"],
        "bench": ["timm"],
        "pretrained": ["safetensors"],
        "tensorboard": ["tensorboard"],
        "cluster": ["submitit"],
        "wandb": ["wandb"],
        "mlflow": ["mlflow"],
    },
    entry_points={
        "console_scripts": [
            "cvnets-train=engine.commands:train",
            "cvnets-eval=engine.commands:evaluate",
            "cvnets-export=engine.commands:export",
            "cvnets-torchrun=engine.commands:torchrun",
        ]
    },
)
