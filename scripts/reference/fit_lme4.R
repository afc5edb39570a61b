# Fit lme4::lmer() on every case of the manifest and write <out>/<name>.json.
#
# Usage: Rscript --vanilla fit_lme4.R MANIFEST DATA_DIR OUT_DIR [CASE ...]
#
# MANIFEST is scripts/reference/cases.json: a list of cases, each with
#   name      the JSON's name (<OUT_DIR>/<name>.json)
#   csv       the data file, in DATA_DIR (row order = stream order)
#   formula   an lme4 formula
#   method    "REML" or "ML"
#   weights   (optional) a column of integer frequency weights: lmer() is fitted on
#             the data with each row repeated w times (not lmer's `weights=`)
#   factors   (optional) columns read as factors; the level order is the order of
#             first appearance in the CSV (streamlmm's reference level is the first
#             level seen), unless `levels` gives it
#   levels    (optional) {"column": ["level", ...]}
# The grouping column `g` is always read as character (keys are strings).
#
# The JSON is the format of scripts/reference/README.md plus `messages`, `dropped`, `optinfo`,
# `varcorr_terms` and (several terms on g only) `condvar_blocks`; scripts/reference/README.md describes it. A case
# lmer() refuses is written with `error` (lme4's message) and no estimates.

suppressPackageStartupMessages({
  library(lme4)
  library(jsonlite)
})
invisible(Sys.setlocale("LC_COLLATE", "C"))

args <- commandArgs(trailingOnly = TRUE)
if (length(args) < 3) stop("usage: fit_lme4.R MANIFEST DATA_DIR OUT_DIR [CASE ...]")
manifest <- fromJSON(args[1], simplifyVector = FALSE)
data_dir <- args[2]
out_dir <- args[3]
only <- args[-(1:3)]
dir.create(out_dir, showWarnings = FALSE, recursive = TRUE)

LME4_VERSION <- as.character(packageVersion("lme4"))

read_case_data <- function(case) {
  path <- file.path(data_dir, case$csv)
  header <- names(read.csv(path, nrows = 1, check.names = FALSE))
  factors <- unlist(case$factors)
  classes <- ifelse(header %in% c("g", factors), "character", "numeric")
  names(classes) <- header
  d <- read.csv(path, colClasses = classes, check.names = FALSE)
  for (f in factors) {
    lev <- if (!is.null(case$levels[[f]])) unlist(case$levels[[f]]) else unique(d[[f]])
    d[[f]] <- factor(d[[f]], levels = lev)
  }
  if (!is.null(case$weights)) {
    w <- d[[case$weights]]
    stopifnot(all(w == round(w)), all(w >= 0))
    d <- d[rep(seq_len(nrow(d)), w), , drop = FALSE]
    rownames(d) <- NULL
  }
  d
}

# lmer() with every warning and message recorded (and muffled), or its error.
fit_recording <- function(formula, d, reml) {
  msgs <- character(0)
  record <- function(cond) msgs <<- c(msgs, trimws(conditionMessage(cond)))
  res <- tryCatch(
    withCallingHandlers(
      lmer(formula, data = d, REML = reml),
      warning = function(w) {
        record(w)
        invokeRestart("muffleWarning")
      },
      message = function(m) {
        record(m)
        invokeRestart("muffleMessage")
      }
    ),
    error = function(e) e
  )
  list(fit = res, messages = msgs)
}

num <- function(x) unname(as.numeric(x))

# Per group: the q×q conditional covariance in ranef()$g's column order, with the
# blocks of each term filled and the entries between terms NA (lme4 does not give them).
condvar_full <- function(re_g, cnms_g, cols) {
  pv <- attr(re_g, "postVar")
  if (!is.list(pv)) pv <- list(pv)
  q <- length(cols)
  ng <- nrow(re_g)
  out <- array(NA_real_, c(q, q, ng))
  blocks <- vector("list", length(cnms_g))
  for (t in seq_along(cnms_g)) {
    ix <- match(cnms_g[[t]], cols)
    out[ix, ix, ] <- pv[[t]]
    blocks[[t]] <- pv[[t]]
  }
  list(full = out, blocks = blocks)
}

fit_case <- function(case) {
  d <- read_case_data(case)
  reml <- identical(case$method, "REML")
  weights <- if (is.null(case$weights)) {
    structure(list(), names = character(0))
  } else {
    sprintf(
      "%s (frequency weights: lme4 was fitted on the data with each row repeated %s times)",
      case$weights, case$weights
    )
  }
  head <- list(
    data = case$csv,
    formula = case$formula,
    method = case$method,
    weights = weights,
    lme4_version = LME4_VERSION
  )
  r <- fit_recording(as.formula(case$formula), d, reml)
  m <- r$fit
  if (inherits(m, "error")) {
    return(c(head, list(
      n = nrow(d),
      n_groups = length(unique(d$g)),
      error = trimws(conditionMessage(m)),
      messages = I(r$messages)
    )))
  }
  cnms <- getME(m, "cnms")
  gname <- unique(names(cnms))
  if (length(gname) != 1) stop("one grouping factor only: ", case$name)
  cnms_g <- cnms[names(cnms) == gname]
  re <- ranef(m, condVar = TRUE)[[gname]]
  cols <- colnames(re)
  q <- length(cols)
  keys <- rownames(re)
  # VarCorr: one matrix per term; re_cov is all of them in ranef()'s column order
  vc <- VarCorr(m)
  re_cov <- matrix(0, q, q)
  terms <- list()
  for (t in seq_along(vc)) {
    ix <- match(cnms[[t]], cols)
    v <- vc[[t]]
    re_cov[ix, ix] <- v
    terms[[t]] <- list(group = names(cnms)[t], names = I(cnms[[t]]), cov = I(num(v)))
  }
  cv <- condvar_full(re, cnms_g, cols)
  ranef_list <- lapply(seq_len(nrow(re)), function(i) num(re[i, ]))
  names(ranef_list) <- keys
  condvar_list <- lapply(seq_len(nrow(re)), function(i) num(cv$full[, , i]))
  names(condvar_list) <- keys
  blocks_list <- lapply(seq_len(nrow(re)), function(i) {
    lapply(cv$blocks, function(b) I(num(b[, , i])))
  })
  names(blocks_list) <- keys
  X <- getME(m, "X")
  dropped <- names(attr(X, "col.dropped"))
  if (is.null(dropped)) dropped <- character(0)
  oi <- m@optinfo
  optinfo <- list(
    optimizer = oi$optimizer,
    feval = oi$feval,
    conv = oi$conv$opt,
    message = if (is.null(oi$message)) "" else oi$message,
    warnings = I(vapply(oi$warnings, as.character, "")),
    lme4_messages = I(as.character(unlist(oi$conv$lme4$messages)))
  )
  c(head, list(
    n = nobs(m),
    n_groups = num(ngrps(m)[[gname]]),
    fixef = as.list(fixef(m)),
    re_names = cols,
    re_cov = num(re_cov),
    re_cov_dim = c(q, q),
    sigma = sigma(m),
    theta = num(getME(m, "theta")),
    criterion = if (reml) REMLcrit(m) else deviance(m),
    logLik = num(logLik(m)),
    singular = isSingular(m),
    ranef = ranef_list,
    condvar = condvar_list,
    messages = I(r$messages),
    dropped = I(dropped),
    optinfo = optinfo,
    varcorr_terms = terms
  ), if (length(cnms_g) > 1) list(condvar_blocks = blocks_list))
}

for (case in manifest) {
  if (length(only) && !(case$name %in% only)) next
  out <- fit_case(case)
  path <- file.path(out_dir, paste0(case$name, ".json"))
  writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE, na = "null"), path)
  status <- if (!is.null(out$error)) paste("error:", out$error) else {
    paste(c(sprintf("crit %.10g", out$criterion), out$messages), collapse = "; ")
  }
  cat(sprintf("%-28s %s\n", case$name, status))
}
