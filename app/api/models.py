"""Model metadata."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from app.api.deps import ModelDep, ServingDep, require_api_key
from app.api.schemas import (
    AUTH_RESPONSES,
    BatchingInfo,
    ErrorResponse,
    LabelList,
    ModelInfo,
    ModelList,
    PreprocessingInfo,
)
from app.state import ServedModel, Serving

router = APIRouter(
    prefix="/v1",
    tags=["models"],
    dependencies=[Depends(require_api_key)],
    responses=AUTH_RESPONSES,
)
_NAMED: dict[int | str, dict[str, object]] = {
    404: {"model": ErrorResponse, "description": "No such model."},
    422: {"model": ErrorResponse, "description": "Invalid request."},
}


def model_info(model: ServedModel, serving: Serving) -> ModelInfo:
    facts, batcher = model.describe(), model.batcher
    pre = facts.preprocessing
    return ModelInfo(
        name=facts.name,
        version=facts.version,
        default=facts.name == serving.settings.default_model,
        source=facts.source,
        architecture=facts.architecture,
        num_classes=len(facts.labels),
        input_size=list(facts.input_size),
        device=facts.device,
        dtype=facts.dtype,
        compiled_batch_sizes=list(facts.compiled_batch_sizes),
        runtime=facts.runtime,
        max_logit_difference=facts.max_logit_difference,
        batching=BatchingInfo(
            max_batch_size=batcher.max_batch_size,
            max_batch_delay_ms=batcher.max_delay_s * 1000.0,
            max_queue_size=batcher.max_queue_size,
        ),
        preprocessing=PreprocessingInfo(
            resize=pre.resize,
            crop=pre.crop,
            interpolation=pre.interpolation,
            color_mode=pre.color_mode,
            mean=list(pre.mean),
            std=list(pre.std),
            device_decode=pre.device_decode,
        ),
    )


@router.get("/models", response_model=ModelList)
async def list_models(serving: ServingDep) -> ModelList:
    """Every model this server serves."""
    return ModelList(models=[model_info(m, serving) for m in serving.models.values()])


@router.get("/models/{name}", response_model=ModelInfo, responses=_NAMED)
async def get_model_info(model: ModelDep, serving: ServingDep) -> ModelInfo:
    """One model's metadata: classes, input size, batching, device and dtype."""
    return model_info(model, serving)


@router.get("/models/{name}/labels", response_model=LabelList, responses=_NAMED)
async def get_model_labels(model: ModelDep) -> LabelList:
    """The model's class names, in output-index order."""
    return LabelList(model=model.name, labels=list(model.labels))
