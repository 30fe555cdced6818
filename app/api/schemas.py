"""Response bodies, named by role, with examples for /docs."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ClassScore(BaseModel):
    label: str = Field(description="Class name from the model's labels file.")
    index: int = Field(description="Class index in the model's output.")
    score: float = Field(description="Softmax probability, 0..1.")


class ImagePrediction(BaseModel):
    file: str = Field(description="The upload's filename, or 'body' for a raw image body.")
    classes: list[ClassScore] = Field(description="The top-k classes, best first.")


class PredictResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "efficientnet_lite0",
                    "predictions": [
                        {
                            "file": "cat.jpg",
                            "classes": [
                                {"label": "Egyptian cat", "index": 285, "score": 0.355},
                                {"label": "tabby", "index": 281, "score": 0.282},
                            ],
                        }
                    ],
                }
            ]
        }
    )

    model: str = Field(description="The model that answered.")
    predictions: list[ImagePrediction] = Field(description="One entry per image, in upload order.")


class BatchingInfo(BaseModel):
    max_batch_size: int
    max_batch_delay_ms: float
    max_queue_size: int


class PreprocessingInfo(BaseModel):
    resize: int | None
    crop: int
    interpolation: str
    color_mode: str
    mean: list[float]
    std: list[float]
    device_decode: bool = Field(
        default=False,
        description="JPEG uploads are decoded on the model's device (GPU decode), a batch at "
        "a time; other formats on the CPU.",
    )


class ModelInfo(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "efficientnet_lite0",
                    "version": "1",
                    "default": True,
                    "source": "timm",
                    "architecture": "tf_efficientnet_lite0",
                    "num_classes": 1000,
                    "input_size": [3, 224, 224],
                    "device": "cpu",
                    "dtype": "float32",
                    "compiled_batch_sizes": [],
                    "runtime": "torch",
                    "max_logit_difference": None,
                    "batching": {
                        "max_batch_size": 16,
                        "max_batch_delay_ms": 5.0,
                        "max_queue_size": 256,
                    },
                    "preprocessing": {
                        "resize": 256,
                        "crop": 224,
                        "interpolation": "bilinear",
                        "color_mode": "RGB",
                        "mean": [0.485, 0.456, 0.406],
                        "std": [0.229, 0.224, 0.225],
                        "device_decode": False,
                    },
                }
            ]
        }
    )

    name: str
    version: str = Field(description="The model's version (model.toml's model.version).")
    default: bool = Field(description="Whether POST /v1/predict answers with this model.")
    source: str = Field(description="timm, torchvision, torchscript or export.")
    architecture: str | None
    num_classes: int
    input_size: list[int] = Field(description="Channels, height, width of the model input.")
    device: str
    dtype: str
    compiled_batch_sizes: list[int] = Field(
        description="Batch sizes torch.compile specialised the model for (a batch runs as the "
        "cheapest mix of them, padded or split); empty when the model runs eagerly."
    )
    runtime: str = Field(description="What runs the forward pass: torch, onnxruntime, openvino.")
    max_logit_difference: float | None = Field(
        description="For an exported runtime, its largest logit difference from the torch "
        "module on the start-up probe images, as a fraction of the largest logit; null for torch."
    )
    batching: BatchingInfo
    preprocessing: PreprocessingInfo


class LabelList(BaseModel):
    model: str
    labels: list[str] = Field(description="Class names in output-index order.")


class ModelList(BaseModel):
    models: list[ModelInfo]


class HealthStatus(BaseModel):
    status: str = Field(examples=["ready"])


class ErrorDetail(BaseModel):
    code: str = Field(examples=["invalid_image"])
    message: str = Field(examples=["cat.jpg: the image data is truncated or corrupt"])


class ErrorResponse(BaseModel):
    error: ErrorDetail


# What any route behind API keys may answer, for the OpenAPI schema.
AUTH_RESPONSES: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorResponse, "description": "API keys are on and none was sent."},
    403: {"model": ErrorResponse, "description": "The API key is not valid."},
}
