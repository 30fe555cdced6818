"""Dependencies that read the server's state, as Annotated aliases so routes stay thin."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request

from app.api.errors import ModelNotFound, ServiceUnavailable
from app.serving import ServedModel, Serving


def get_serving(request: Request) -> Serving:
    serving: Serving | None = getattr(request.app.state, "serving", None)
    if serving is None:
        raise ServiceUnavailable("the server is starting", headers={"Retry-After": "1"})
    return serving


ServingDep = Annotated[Serving, Depends(get_serving)]


def get_model(
    serving: ServingDep,
    name: Annotated[str, Path(description="Model name, as listed by GET /v1/models.")],
) -> ServedModel:
    try:
        return serving.models[name]
    except KeyError:
        raise ModelNotFound(
            f"no model named {name!r}; available: {', '.join(sorted(serving.models))}"
        ) from None


def get_default_model(serving: ServingDep) -> ServedModel:
    return serving.default_model


ModelDep = Annotated[ServedModel, Depends(get_model)]
DefaultModelDep = Annotated[ServedModel, Depends(get_default_model)]
