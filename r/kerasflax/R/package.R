# The Python side, imported on first use (installing or loading this package
# needs no Python).
.py <- new.env(parent = emptyenv())

.onLoad <- function(libname, pkgname) {
  .py$keras_flax <- reticulate::import("keras_flax", delay_load = TRUE)
  .py$keras <- reticulate::import("keras", delay_load = TRUE)
  .py$numpy <- reticulate::import("numpy", delay_load = TRUE)
  .py$r_helpers <- reticulate::import("keras_flax._r", convert = FALSE,
                                      delay_load = TRUE)
  .py$builtins <- reticulate::import("builtins", convert = FALSE,
                                     delay_load = TRUE)
}

keras_flax <- function() {
  # keras_flax first: it selects the JAX backend when KERAS_BACKEND is unset.
  .py$keras_flax
}
