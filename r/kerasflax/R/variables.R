# R values <-> Python arrays and trees of arrays, as raw bytes (see
# keras_flax/_r.py: reticulate's own array conversion needs a NumPy its
# older releases do not support).

# Documented in man/as_py_array.Rd (with as_r_array, as_r_variables).
as_py_array <- function(x, dtype = NULL) {
  if (!(is.numeric(x) || is.logical(x)) || is.object(x)) {
    stop(
      "as_py_array(): `x` must be an R numeric, integer or logical vector ",
      "or array; got ", describe(x), ". Convert it with as.array() or ",
      "as.numeric() first.",
      call. = FALSE
    )
  }
  kind <- if (is.logical(x)) "logical" else if (is.integer(x)) "integer" else "double"
  if (is.null(dtype)) {
    dtype <- switch(kind,
      logical = "bool",
      integer = "int32",
      double = .py$keras$config$floatx()
    )
  }
  values <- switch(kind,
    logical = as.integer(x),
    integer = as.vector(x),
    double = as.double(x)
  )
  dims <- if (!is.null(dim(x))) {
    as.list(as.integer(dim(x)))
  } else if (length(x) == 1) {
    list()
  } else {
    list(length(x))
  }
  .py$r_helpers$from_r(writeBin(values, raw(), endian = "little"), kind, dims, dtype)
}

as_r_array <- function(x) {
  from_r_bytes(.py$r_helpers$to_r(x))
}

from_r_bytes <- function(parts) {
  data <- reticulate::py_to_r(reticulate::py_get_item(parts, 0L))
  kind <- reticulate::py_to_r(reticulate::py_get_item(parts, 1L))
  dims <- as.integer(unlist(reticulate::py_to_r(reticulate::py_get_item(parts, 2L))))
  size <- if (kind == "double") 8L else 4L
  values <- readBin(data,
    what = if (kind == "double") "double" else "integer",
    n = length(data) %/% size, size = size, endian = "little"
  )
  if (kind == "logical") values <- as.logical(values)
  if (length(dims) > 0) dim(values) <- dims
  values
}

as_r_variables <- function(x) {
  r_tree(.py$r_helpers$tree_to_r(x))
}

r_tree <- function(node) {
  builtins <- .py$builtins
  if (reticulate::py_to_r(builtins$isinstance(node, builtins$dict))) {
    keys <- reticulate::py_to_r(builtins$list(node$keys()))
    values <- lapply(keys, function(key) r_tree(node$get(key)))
    return(stats::setNames(values, vapply(keys, as.character, "")))
  }
  if (reticulate::py_to_r(builtins$isinstance(node, .py$r_helpers$RArray))) {
    return(from_r_bytes(node))
  }
  if (reticulate::py_to_r(builtins$isinstance(
    node, reticulate::tuple(builtins$list, builtins$tuple)
  ))) {
    size <- reticulate::py_to_r(builtins$len(node))
    return(lapply(seq_len(size) - 1L, function(i) {
      r_tree(reticulate::py_get_item(node, i))
    }))
  }
  stop("as_r_variables(): a leaf that is not an array: ",
       describe(node), ".", call. = FALSE)
}

# A named (nested) R list of R arrays -> the Python dicts of NumPy arrays the
# layers take (see as_py_array() for types and shapes). Python objects are
# passed as they are.
as_py_variables <- function(x, arg) {
  if (is.null(x) || inherits(x, "python.builtin.object")) {
    return(x)
  }
  if (is.list(x) && !is.object(x)) {
    if (length(x) > 0 && (is.null(names(x)) || any(names(x) == ""))) {
      stop(
        "`", arg, "` must be a named list (nested), as Flax names its ",
        "variables, e.g. list(params = list(Dense_0 = list(kernel = ..., ",
        "bias = ...))); got a list with unnamed elements. Name every ",
        "element.",
        call. = FALSE
      )
    }
    return(reticulate::dict(lapply(x, as_py_variables, arg = arg)))
  }
  if ((is.numeric(x) || is.logical(x)) && !is.object(x)) {
    return(as_py_array(x))
  }
  stop(
    "`", arg, "` must hold arrays (R numeric, integer or logical arrays, ",
    "or Python arrays) in named lists; got ", describe(x), ". Give each ",
    "variable as an array.",
    call. = FALSE
  )
}
