# Documented in man/layer_flax_module_wrapper.Rd.
layer_flax_module_wrapper <- function(object, module, method = NULL,
                                      variables = NULL, ...) {
  helper <- "layer_flax_module_wrapper"
  object <- compose_target(if (missing(object)) NULL else object, helper)
  if (missing(module)) {
    missing_argument(
      helper, "module",
      "a Flax module (a flax$linen$Module or flax$nnx$Module instance)",
      "module = MyFlaxModule()"
    )
  }
  args <- c(
    list(
      object = object,
      module = module,
      method = as_py_function(method),
      variables = as_py_variables(variables, "variables")
    ),
    layer_arguments(list(...))
  )
  composed(object, do.call(keras_flax()$layer_flax_module_wrapper, args))
}

# Documented in man/layer_jax_model_wrapper.Rd.
layer_jax_model_wrapper <- function(object, call_fn, init_fn = NULL,
                                    params = NULL, state = NULL, seed = NULL,
                                    ...) {
  helper <- "layer_jax_model_wrapper"
  object <- compose_target(if (missing(object)) NULL else object, helper)
  if (missing(call_fn)) {
    missing_argument(
      helper, "call_fn",
      paste0(
        "a function of (params, state, rng, inputs, training) - any of ",
        "them, inputs required"
      ),
      "call_fn = function(params, inputs) { ... }"
    )
  }
  args <- c(
    list(
      object = object,
      call_fn = as_py_function(call_fn),
      init_fn = as_py_function(init_fn),
      params = as_py_variables(params, "params"),
      state = as_py_variables(state, "state")
    ),
    layer_arguments(list(..., seed = seed))
  )
  composed(object, do.call(keras_flax()$layer_jax_model_wrapper, args))
}

missing_argument <- function(helper, arg, expected, example) {
  stop(
    helper, "(): `", arg, "` is missing: expected ", expected, ". Pass ",
    example, ".",
    call. = FALSE
  )
}

# What `object` may be, checked in R before anything is built.
compose_target <- function(object, helper) {
  if (is.null(object)) {
    return(NULL)
  }
  if (is.array(object) || (is.atomic(object) && is.numeric(object))) {
    return(as_py_array(object))
  }
  if (inherits(object, "python.builtin.object")) {
    keras <- .py$keras
    isinstance <- .py$builtins$isinstance
    if (reticulate::py_to_r(isinstance(object, keras$Sequential)) ||
        keras$utils$is_keras_tensor(object) ||
        reticulate::py_to_r(isinstance(object, .py$numpy$ndarray)) ||
        reticulate::py_to_r(isinstance(
          object, reticulate::import("jax")$Array
        ))) {
      return(object)
    }
  }
  stop(
    helper, "(): `object` must be a Sequential model (the layer is added ",
    "to it), a Keras tensor such as keras$Input(...) (the layer's output ",
    "is returned), an array, or left out / NULL (the layer is returned); ",
    "got ", describe(object), ". Pass the model or tensor to compose with, ",
    "or leave `object` out to get the layer.",
    call. = FALSE
  )
}

composed <- function(object, result) {
  if (!is.null(object) &&
      reticulate::py_to_r(.py$builtins$isinstance(object, .py$keras$Sequential))) {
    return(invisible(result))
  }
  result
}

describe <- function(x) {
  if (inherits(x, "python.builtin.object")) {
    type <- .py$builtins$type(x)
    return(paste0(
      "a Python ", reticulate::py_to_r(type$`__module__`), ".",
      reticulate::py_to_r(type$`__qualname__`)
    ))
  }
  shown <- paste(utils::capture.output(utils::str(x, give.attr = FALSE)),
                 collapse = " ")
  if (nchar(shown) > 60) shown <- paste0(substr(shown, 1, 57), "...")
  paste0("an R ", class(x)[[1]], " (", trimws(shown), ")")
}

# R functions keep their argument names in Python: the layers call
# `method`, `call_fn` and `init_fn` by argument name.
as_py_function <- function(f) {
  if (is.function(f) && !inherits(f, "python.builtin.object")) {
    reticulate::py_func(f)
  } else {
    f
  }
}

# Layer arguments: whole numbers where Python expects integers.
layer_arguments <- function(args) {
  args <- args[!vapply(args, is.null, logical(1))]
  if (!is.null(args$seed) && is.numeric(args$seed) &&
      length(args$seed) == 1 && args$seed == round(args$seed)) {
    args$seed <- as.integer(args$seed)
  }
  args
}
