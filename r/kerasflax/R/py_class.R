# Documented in man/py_class.Rd.
`%py_class%` <- function(spec, body) {
  spec <- substitute(spec)
  body <- substitute(body)
  env <- parent.frame()
  if (!is.call(spec) && !is.name(spec)) {
    stop(
      "%py_class%: the left side must be ClassName(Base, ...), as in ",
      "MyModule(flax$linen$Module) %py_class% { ... }; got `",
      deparse(spec), "`.",
      call. = FALSE
    )
  }
  classname <- deparse(if (is.call(spec)) spec[[1]] else spec)
  bases <- if (is.call(spec)) lapply(as.list(spec)[-1], eval, envir = env)
  members <- new.env(parent = env)
  eval(body, members)
  defs <- as.list(members, all.names = TRUE, sorted = TRUE)
  names(defs)[names(defs) == "initialize"] <- "__init__"
  defs <- lapply(defs, function(member) {
    # Methods keep their argument names (`self`, `inputs`, ...) in Python.
    if (is.function(member) && !inherits(member, "python.builtin.object")) {
      reticulate::py_func(member)
    } else {
      member
    }
  })
  defs$`__module__` <- environment_label(env)
  defs$`__qualname__` <- classname
  class <- .py$builtins$type(
    classname,
    do.call(reticulate::tuple, unname(bases)),
    do.call(reticulate::dict, defs)
  )
  class <- reticulate::py_to_r(class)
  assign(classname, class, envir = env)
  invisible(class)
}

environment_label <- function(env) {
  label <- environmentName(env)
  if (identical(label, "")) "R_local" else gsub("[^A-Za-z0-9_]", "_", label)
}
