from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Dtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[Dtype]
    DTYPE_FLOAT32: _ClassVar[Dtype]
    DTYPE_FLOAT64: _ClassVar[Dtype]
    DTYPE_FLOAT16: _ClassVar[Dtype]
    DTYPE_BFLOAT16: _ClassVar[Dtype]
    DTYPE_INT64: _ClassVar[Dtype]

class PaddingMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PADDING_MODE_UNSPECIFIED: _ClassVar[PaddingMode]
    PADDING_MODE_VALID: _ClassVar[PaddingMode]
    PADDING_MODE_SAME: _ClassVar[PaddingMode]

class Loss(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOSS_UNSPECIFIED: _ClassVar[Loss]
    LOSS_MSE: _ClassVar[Loss]
    LOSS_HALF_MSE: _ClassVar[Loss]
    LOSS_HALF_SSE: _ClassVar[Loss]
    LOSS_CROSS_ENTROPY: _ClassVar[Loss]

class StopReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOP_REASON_UNSPECIFIED: _ClassVar[StopReason]
    STOP_REASON_CONVERGED: _ClassVar[StopReason]
    STOP_REASON_MAX_STEPS: _ClassVar[StopReason]
    STOP_REASON_CANCELLED: _ClassVar[StopReason]
    STOP_REASON_DIVERGED: _ClassVar[StopReason]
    STOP_REASON_TIME_LIMIT: _ClassVar[StopReason]
DTYPE_UNSPECIFIED: Dtype
DTYPE_FLOAT32: Dtype
DTYPE_FLOAT64: Dtype
DTYPE_FLOAT16: Dtype
DTYPE_BFLOAT16: Dtype
DTYPE_INT64: Dtype
PADDING_MODE_UNSPECIFIED: PaddingMode
PADDING_MODE_VALID: PaddingMode
PADDING_MODE_SAME: PaddingMode
LOSS_UNSPECIFIED: Loss
LOSS_MSE: Loss
LOSS_HALF_MSE: Loss
LOSS_HALF_SSE: Loss
LOSS_CROSS_ENTROPY: Loss
STOP_REASON_UNSPECIFIED: StopReason
STOP_REASON_CONVERGED: StopReason
STOP_REASON_MAX_STEPS: StopReason
STOP_REASON_CANCELLED: StopReason
STOP_REASON_DIVERGED: StopReason
STOP_REASON_TIME_LIMIT: StopReason

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "shared")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    dtype: Dtype
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    shared: SharedSpan
    def __init__(self, dtype: _Optional[_Union[Dtype, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., shared: _Optional[_Union[SharedSpan, _Mapping]] = ...) -> None: ...

class SharedSpan(_message.Message):
    __slots__ = ("offset", "region_id")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    REGION_ID_FIELD_NUMBER: _ClassVar[int]
    offset: int
    region_id: int
    def __init__(self, offset: _Optional[int] = ..., region_id: _Optional[int] = ...) -> None: ...

class Size2(_message.Message):
    __slots__ = ("height", "width")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    height: int
    width: int
    def __init__(self, height: _Optional[int] = ..., width: _Optional[int] = ...) -> None: ...

class Padding(_message.Message):
    __slots__ = ("size", "mode")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    size: Size2
    mode: PaddingMode
    def __init__(self, size: _Optional[_Union[Size2, _Mapping]] = ..., mode: _Optional[_Union[PaddingMode, str]] = ...) -> None: ...

class Conv2dOptions(_message.Message):
    __slots__ = ("stride", "padding", "dilation", "groups")
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    DILATION_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    stride: Size2
    padding: Padding
    dilation: Size2
    groups: int
    def __init__(self, stride: _Optional[_Union[Size2, _Mapping]] = ..., padding: _Optional[_Union[Padding, _Mapping]] = ..., dilation: _Optional[_Union[Size2, _Mapping]] = ..., groups: _Optional[int] = ...) -> None: ...

class ConvTranspose2dOptions(_message.Message):
    __slots__ = ("stride", "padding", "output_padding", "groups", "dilation")
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PADDING_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    DILATION_FIELD_NUMBER: _ClassVar[int]
    stride: Size2
    padding: Size2
    output_padding: Size2
    groups: int
    dilation: Size2
    def __init__(self, stride: _Optional[_Union[Size2, _Mapping]] = ..., padding: _Optional[_Union[Size2, _Mapping]] = ..., output_padding: _Optional[_Union[Size2, _Mapping]] = ..., groups: _Optional[int] = ..., dilation: _Optional[_Union[Size2, _Mapping]] = ...) -> None: ...

class MaxPool2dOptions(_message.Message):
    __slots__ = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
    KERNEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    DILATION_FIELD_NUMBER: _ClassVar[int]
    CEIL_MODE_FIELD_NUMBER: _ClassVar[int]
    RETURN_INDICES_FIELD_NUMBER: _ClassVar[int]
    kernel_size: Size2
    stride: Size2
    padding: Size2
    dilation: Size2
    ceil_mode: bool
    return_indices: bool
    def __init__(self, kernel_size: _Optional[_Union[Size2, _Mapping]] = ..., stride: _Optional[_Union[Size2, _Mapping]] = ..., padding: _Optional[_Union[Size2, _Mapping]] = ..., dilation: _Optional[_Union[Size2, _Mapping]] = ..., ceil_mode: _Optional[bool] = ..., return_indices: _Optional[bool] = ...) -> None: ...

class AvgPool2dOptions(_message.Message):
    __slots__ = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")
    KERNEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    STRIDE_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    CEIL_MODE_FIELD_NUMBER: _ClassVar[int]
    COUNT_INCLUDE_PAD_FIELD_NUMBER: _ClassVar[int]
    DIVISOR_OVERRIDE_FIELD_NUMBER: _ClassVar[int]
    kernel_size: Size2
    stride: Size2
    padding: Size2
    ceil_mode: bool
    count_include_pad: bool
    divisor_override: int
    def __init__(self, kernel_size: _Optional[_Union[Size2, _Mapping]] = ..., stride: _Optional[_Union[Size2, _Mapping]] = ..., padding: _Optional[_Union[Size2, _Mapping]] = ..., ceil_mode: _Optional[bool] = ..., count_include_pad: _Optional[bool] = ..., divisor_override: _Optional[int] = ...) -> None: ...

class ReluOptions(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FlattenOptions(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LinearOptions(_message.Message):
    __slots__ = ("in_features", "out_features", "bias")
    IN_FEATURES_FIELD_NUMBER: _ClassVar[int]
    OUT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    in_features: int
    out_features: int
    bias: bool
    def __init__(self, in_features: _Optional[int] = ..., out_features: _Optional[int] = ..., bias: _Optional[bool] = ...) -> None: ...

class Op(_message.Message):
    __slots__ = ("conv2d", "conv_transpose2d", "max_pool2d", "avg_pool2d", "relu")
    CONV2D_FIELD_NUMBER: _ClassVar[int]
    CONV_TRANSPOSE2D_FIELD_NUMBER: _ClassVar[int]
    MAX_POOL2D_FIELD_NUMBER: _ClassVar[int]
    AVG_POOL2D_FIELD_NUMBER: _ClassVar[int]
    RELU_FIELD_NUMBER: _ClassVar[int]
    conv2d: Conv2dOptions
    conv_transpose2d: ConvTranspose2dOptions
    max_pool2d: MaxPool2dOptions
    avg_pool2d: AvgPool2dOptions
    relu: ReluOptions
    def __init__(self, conv2d: _Optional[_Union[Conv2dOptions, _Mapping]] = ..., conv_transpose2d: _Optional[_Union[ConvTranspose2dOptions, _Mapping]] = ..., max_pool2d: _Optional[_Union[MaxPool2dOptions, _Mapping]] = ..., avg_pool2d: _Optional[_Union[AvgPool2dOptions, _Mapping]] = ..., relu: _Optional[_Union[ReluOptions, _Mapping]] = ...) -> None: ...

class Layer(_message.Message):
    __slots__ = ("conv2d", "conv_transpose2d", "max_pool2d", "avg_pool2d", "relu", "flatten", "linear", "in_channels", "out_channels", "kernel_size", "bias")
    CONV2D_FIELD_NUMBER: _ClassVar[int]
    CONV_TRANSPOSE2D_FIELD_NUMBER: _ClassVar[int]
    MAX_POOL2D_FIELD_NUMBER: _ClassVar[int]
    AVG_POOL2D_FIELD_NUMBER: _ClassVar[int]
    RELU_FIELD_NUMBER: _ClassVar[int]
    FLATTEN_FIELD_NUMBER: _ClassVar[int]
    LINEAR_FIELD_NUMBER: _ClassVar[int]
    IN_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    OUT_CHANNELS_FIELD_NUMBER: _ClassVar[int]
    KERNEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    conv2d: Conv2dOptions
    conv_transpose2d: ConvTranspose2dOptions
    max_pool2d: MaxPool2dOptions
    avg_pool2d: AvgPool2dOptions
    relu: ReluOptions
    flatten: FlattenOptions
    linear: LinearOptions
    in_channels: int
    out_channels: int
    kernel_size: Size2
    bias: bool
    def __init__(self, conv2d: _Optional[_Union[Conv2dOptions, _Mapping]] = ..., conv_transpose2d: _Optional[_Union[ConvTranspose2dOptions, _Mapping]] = ..., max_pool2d: _Optional[_Union[MaxPool2dOptions, _Mapping]] = ..., avg_pool2d: _Optional[_Union[AvgPool2dOptions, _Mapping]] = ..., relu: _Optional[_Union[ReluOptions, _Mapping]] = ..., flatten: _Optional[_Union[FlattenOptions, _Mapping]] = ..., linear: _Optional[_Union[LinearOptions, _Mapping]] = ..., in_channels: _Optional[int] = ..., out_channels: _Optional[int] = ..., kernel_size: _Optional[_Union[Size2, _Mapping]] = ..., bias: _Optional[bool] = ...) -> None: ...

class Network(_message.Message):
    __slots__ = ("layers",)
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[Layer]
    def __init__(self, layers: _Optional[_Iterable[_Union[Layer, _Mapping]]] = ...) -> None: ...

class LayerParams(_message.Message):
    __slots__ = ("weight", "bias")
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    weight: Tensor
    bias: Tensor
    def __init__(self, weight: _Optional[_Union[Tensor, _Mapping]] = ..., bias: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class SharedMemoryContext(_message.Message):
    __slots__ = ("session_id", "output_buffer")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_BUFFER_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    output_buffer: SharedBuffer
    def __init__(self, session_id: _Optional[str] = ..., output_buffer: _Optional[_Union[SharedBuffer, _Mapping]] = ...) -> None: ...

class SharedBuffer(_message.Message):
    __slots__ = ("offset", "size", "region_id")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    REGION_ID_FIELD_NUMBER: _ClassVar[int]
    offset: int
    size: int
    region_id: int
    def __init__(self, offset: _Optional[int] = ..., size: _Optional[int] = ..., region_id: _Optional[int] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("op", "network", "input", "weight", "bias", "shared_memory", "params")
    OP_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    op: Op
    network: Network
    input: Tensor
    weight: Tensor
    bias: Tensor
    shared_memory: SharedMemoryContext
    params: _containers.RepeatedCompositeFieldContainer[LayerParams]
    def __init__(self, op: _Optional[_Union[Op, _Mapping]] = ..., network: _Optional[_Union[Network, _Mapping]] = ..., input: _Optional[_Union[Tensor, _Mapping]] = ..., weight: _Optional[_Union[Tensor, _Mapping]] = ..., bias: _Optional[_Union[Tensor, _Mapping]] = ..., shared_memory: _Optional[_Union[SharedMemoryContext, _Mapping]] = ..., params: _Optional[_Iterable[_Union[LayerParams, _Mapping]]] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("output", "indices")
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    output: Tensor
    indices: Tensor
    def __init__(self, output: _Optional[_Union[Tensor, _Mapping]] = ..., indices: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("op", "network", "grad_output", "input", "weight", "bias", "shared_memory", "params")
    OP_FIELD_NUMBER: _ClassVar[int]
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    GRAD_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    op: Op
    network: Network
    grad_output: Tensor
    input: Tensor
    weight: Tensor
    bias: Tensor
    shared_memory: SharedMemoryContext
    params: _containers.RepeatedCompositeFieldContainer[LayerParams]
    def __init__(self, op: _Optional[_Union[Op, _Mapping]] = ..., network: _Optional[_Union[Network, _Mapping]] = ..., grad_output: _Optional[_Union[Tensor, _Mapping]] = ..., input: _Optional[_Union[Tensor, _Mapping]] = ..., weight: _Optional[_Union[Tensor, _Mapping]] = ..., bias: _Optional[_Union[Tensor, _Mapping]] = ..., shared_memory: _Optional[_Union[SharedMemoryContext, _Mapping]] = ..., params: _Optional[_Iterable[_Union[LayerParams, _Mapping]]] = ...) -> None: ...

class BackwardResponse(_message.Message):
    __slots__ = ("grad_input", "grad_weight", "grad_bias", "grad_params")
    GRAD_INPUT_FIELD_NUMBER: _ClassVar[int]
    GRAD_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    GRAD_BIAS_FIELD_NUMBER: _ClassVar[int]
    GRAD_PARAMS_FIELD_NUMBER: _ClassVar[int]
    grad_input: Tensor
    grad_weight: Tensor
    grad_bias: Tensor
    grad_params: _containers.RepeatedCompositeFieldContainer[LayerParams]
    def __init__(self, grad_input: _Optional[_Union[Tensor, _Mapping]] = ..., grad_weight: _Optional[_Union[Tensor, _Mapping]] = ..., grad_bias: _Optional[_Union[Tensor, _Mapping]] = ..., grad_params: _Optional[_Iterable[_Union[LayerParams, _Mapping]]] = ...) -> None: ...

class SgdOptions(_message.Message):
    __slots__ = ("lr", "momentum", "nesterov", "weight_decay")
    LR_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    NESTEROV_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    def __init__(self, lr: _Optional[float] = ..., momentum: _Optional[float] = ..., nesterov: _Optional[bool] = ..., weight_decay: _Optional[float] = ...) -> None: ...

class AdamOptions(_message.Message):
    __slots__ = ("lr", "beta1", "beta2", "eps", "weight_decay")
    LR_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    def __init__(self, lr: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., weight_decay: _Optional[float] = ...) -> None: ...

class TrainKernelRequest(_message.Message):
    __slots__ = ("input", "target", "init_weight", "kernel_size", "bias", "init_bias", "conv", "sgd", "adam", "loss", "max_steps", "tol", "report_every", "seed", "batch_size", "max_seconds", "snapshot_every", "run_id")
    INPUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    INIT_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    KERNEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    INIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    CONV_FIELD_NUMBER: _ClassVar[int]
    SGD_FIELD_NUMBER: _ClassVar[int]
    ADAM_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    TOL_FIELD_NUMBER: _ClassVar[int]
    REPORT_EVERY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_EVERY_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    input: Tensor
    target: Tensor
    init_weight: Tensor
    kernel_size: Size2
    bias: bool
    init_bias: Tensor
    conv: Conv2dOptions
    sgd: SgdOptions
    adam: AdamOptions
    loss: Loss
    max_steps: int
    tol: float
    report_every: int
    seed: int
    batch_size: int
    max_seconds: float
    snapshot_every: int
    run_id: str
    def __init__(self, input: _Optional[_Union[Tensor, _Mapping]] = ..., target: _Optional[_Union[Tensor, _Mapping]] = ..., init_weight: _Optional[_Union[Tensor, _Mapping]] = ..., kernel_size: _Optional[_Union[Size2, _Mapping]] = ..., bias: _Optional[bool] = ..., init_bias: _Optional[_Union[Tensor, _Mapping]] = ..., conv: _Optional[_Union[Conv2dOptions, _Mapping]] = ..., sgd: _Optional[_Union[SgdOptions, _Mapping]] = ..., adam: _Optional[_Union[AdamOptions, _Mapping]] = ..., loss: _Optional[_Union[Loss, str]] = ..., max_steps: _Optional[int] = ..., tol: _Optional[float] = ..., report_every: _Optional[int] = ..., seed: _Optional[int] = ..., batch_size: _Optional[int] = ..., max_seconds: _Optional[float] = ..., snapshot_every: _Optional[int] = ..., run_id: _Optional[str] = ...) -> None: ...

class TrainProgress(_message.Message):
    __slots__ = ("step", "loss", "elapsed_seconds", "grad_norm", "weight", "accuracy")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    step: int
    loss: float
    elapsed_seconds: float
    grad_norm: float
    weight: Tensor
    accuracy: float
    def __init__(self, step: _Optional[int] = ..., loss: _Optional[float] = ..., elapsed_seconds: _Optional[float] = ..., grad_norm: _Optional[float] = ..., weight: _Optional[_Union[Tensor, _Mapping]] = ..., accuracy: _Optional[float] = ...) -> None: ...

class TrainResult(_message.Message):
    __slots__ = ("weight", "bias", "steps", "loss", "stop_reason", "elapsed_seconds", "loss_history")
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LOSS_HISTORY_FIELD_NUMBER: _ClassVar[int]
    weight: Tensor
    bias: Tensor
    steps: int
    loss: float
    stop_reason: StopReason
    elapsed_seconds: float
    loss_history: Tensor
    def __init__(self, weight: _Optional[_Union[Tensor, _Mapping]] = ..., bias: _Optional[_Union[Tensor, _Mapping]] = ..., steps: _Optional[int] = ..., loss: _Optional[float] = ..., stop_reason: _Optional[_Union[StopReason, str]] = ..., elapsed_seconds: _Optional[float] = ..., loss_history: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class StopTrainingRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class StopTrainingResponse(_message.Message):
    __slots__ = ("stopped",)
    STOPPED_FIELD_NUMBER: _ClassVar[int]
    stopped: bool
    def __init__(self, stopped: _Optional[bool] = ...) -> None: ...

class TrainKernelResponse(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: TrainProgress
    result: TrainResult
    def __init__(self, progress: _Optional[_Union[TrainProgress, _Mapping]] = ..., result: _Optional[_Union[TrainResult, _Mapping]] = ...) -> None: ...

class TrainNetworkRequest(_message.Message):
    __slots__ = ("network", "input", "target", "params", "sgd", "adam", "loss", "max_steps", "tol", "report_every", "seed", "batch_size", "max_seconds", "run_id")
    NETWORK_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    SGD_FIELD_NUMBER: _ClassVar[int]
    ADAM_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    TOL_FIELD_NUMBER: _ClassVar[int]
    REPORT_EVERY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    network: Network
    input: Tensor
    target: Tensor
    params: _containers.RepeatedCompositeFieldContainer[LayerParams]
    sgd: SgdOptions
    adam: AdamOptions
    loss: Loss
    max_steps: int
    tol: float
    report_every: int
    seed: int
    batch_size: int
    max_seconds: float
    run_id: str
    def __init__(self, network: _Optional[_Union[Network, _Mapping]] = ..., input: _Optional[_Union[Tensor, _Mapping]] = ..., target: _Optional[_Union[Tensor, _Mapping]] = ..., params: _Optional[_Iterable[_Union[LayerParams, _Mapping]]] = ..., sgd: _Optional[_Union[SgdOptions, _Mapping]] = ..., adam: _Optional[_Union[AdamOptions, _Mapping]] = ..., loss: _Optional[_Union[Loss, str]] = ..., max_steps: _Optional[int] = ..., tol: _Optional[float] = ..., report_every: _Optional[int] = ..., seed: _Optional[int] = ..., batch_size: _Optional[int] = ..., max_seconds: _Optional[float] = ..., run_id: _Optional[str] = ...) -> None: ...

class TrainNetworkResult(_message.Message):
    __slots__ = ("params", "steps", "loss", "stop_reason", "elapsed_seconds", "loss_history", "accuracy")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LOSS_HISTORY_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    params: _containers.RepeatedCompositeFieldContainer[LayerParams]
    steps: int
    loss: float
    stop_reason: StopReason
    elapsed_seconds: float
    loss_history: Tensor
    accuracy: float
    def __init__(self, params: _Optional[_Iterable[_Union[LayerParams, _Mapping]]] = ..., steps: _Optional[int] = ..., loss: _Optional[float] = ..., stop_reason: _Optional[_Union[StopReason, str]] = ..., elapsed_seconds: _Optional[float] = ..., loss_history: _Optional[_Union[Tensor, _Mapping]] = ..., accuracy: _Optional[float] = ...) -> None: ...

class TrainNetworkResponse(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: TrainProgress
    result: TrainNetworkResult
    def __init__(self, progress: _Optional[_Union[TrainProgress, _Mapping]] = ..., result: _Optional[_Union[TrainNetworkResult, _Mapping]] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("version", "backend", "device", "max_message_bytes", "max_elements", "max_train_steps", "max_train_seconds", "ops", "dtypes", "compute_threads", "side_channel_port")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    MAX_TRAIN_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_TRAIN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OPS_FIELD_NUMBER: _ClassVar[int]
    DTYPES_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_THREADS_FIELD_NUMBER: _ClassVar[int]
    SIDE_CHANNEL_PORT_FIELD_NUMBER: _ClassVar[int]
    version: str
    backend: str
    device: str
    max_message_bytes: int
    max_elements: int
    max_train_steps: int
    max_train_seconds: float
    ops: _containers.RepeatedScalarFieldContainer[str]
    dtypes: _containers.RepeatedScalarFieldContainer[Dtype]
    compute_threads: int
    side_channel_port: int
    def __init__(self, version: _Optional[str] = ..., backend: _Optional[str] = ..., device: _Optional[str] = ..., max_message_bytes: _Optional[int] = ..., max_elements: _Optional[int] = ..., max_train_steps: _Optional[int] = ..., max_train_seconds: _Optional[float] = ..., ops: _Optional[_Iterable[str]] = ..., dtypes: _Optional[_Iterable[_Union[Dtype, str]]] = ..., compute_threads: _Optional[int] = ..., side_channel_port: _Optional[int] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class ForwardStreamRequest(_message.Message):
    __slots__ = ("request", "chunk", "side_channel")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SIDE_CHANNEL_FIELD_NUMBER: _ClassVar[int]
    request: ForwardRequest
    chunk: TensorChunk
    side_channel: bool
    def __init__(self, request: _Optional[_Union[ForwardRequest, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ..., side_channel: _Optional[bool] = ...) -> None: ...

class ForwardStreamResponse(_message.Message):
    __slots__ = ("response", "chunk", "side_channel")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SIDE_CHANNEL_FIELD_NUMBER: _ClassVar[int]
    response: ForwardResponse
    chunk: TensorChunk
    side_channel: SideChannelOffer
    def __init__(self, response: _Optional[_Union[ForwardResponse, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ..., side_channel: _Optional[_Union[SideChannelOffer, _Mapping]] = ...) -> None: ...

class BackwardStreamRequest(_message.Message):
    __slots__ = ("request", "chunk", "side_channel")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SIDE_CHANNEL_FIELD_NUMBER: _ClassVar[int]
    request: BackwardRequest
    chunk: TensorChunk
    side_channel: bool
    def __init__(self, request: _Optional[_Union[BackwardRequest, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ..., side_channel: _Optional[bool] = ...) -> None: ...

class BackwardStreamResponse(_message.Message):
    __slots__ = ("response", "chunk", "side_channel")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    SIDE_CHANNEL_FIELD_NUMBER: _ClassVar[int]
    response: BackwardResponse
    chunk: TensorChunk
    side_channel: SideChannelOffer
    def __init__(self, response: _Optional[_Union[BackwardResponse, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ..., side_channel: _Optional[_Union[SideChannelOffer, _Mapping]] = ...) -> None: ...

class OpenSharedMemorySessionRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OpenSharedMemorySessionResponse(_message.Message):
    __slots__ = ("session_id", "socket_address", "connect_token", "max_region_bytes", "max_regions")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SOCKET_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CONNECT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MAX_REGION_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_REGIONS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    socket_address: str
    connect_token: bytes
    max_region_bytes: int
    max_regions: int
    def __init__(self, session_id: _Optional[str] = ..., socket_address: _Optional[str] = ..., connect_token: _Optional[bytes] = ..., max_region_bytes: _Optional[int] = ..., max_regions: _Optional[int] = ...) -> None: ...

class CloseSharedMemorySessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSharedMemorySessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SideChannelOffer(_message.Message):
    __slots__ = ("host", "port", "token")
    HOST_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    host: str
    port: int
    token: bytes
    def __init__(self, host: _Optional[str] = ..., port: _Optional[int] = ..., token: _Optional[bytes] = ...) -> None: ...
