"""Statistics for repeated FID runs: summary, t-tests (scipy) and a bootstrap interval."""

import csv
import json
import math
import os

import numpy as np
import scipy.stats

def summarize(values):
    """n, mean, standard deviation (ddof=1) and standard error of the mean."""
    v = np.asarray(values, dtype=np.float64)
    if v.size < 2:
        raise ValueError(f'need at least 2 values for a spread, got {v.size}')
    std = float(v.std(ddof=1))
    return dict(n=int(v.size), mean=float(v.mean()), std=std, se=std / math.sqrt(v.size))

def t_from_summary(mean, se, baseline):
    """One-sample t statistic from a reported mean and standard error."""
    return (mean - baseline) / se

def one_sample_t(values, baseline):
    r = scipy.stats.ttest_1samp(np.asarray(values, dtype=np.float64), baseline)
    return dict(baseline=float(baseline), t=float(r.statistic), p=float(r.pvalue), df=len(values) - 1)

def welch_t(a, b):
    r = scipy.stats.ttest_ind(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), equal_var=False)
    return dict(t=float(r.statistic), p=float(r.pvalue))

def paired_t(a, b):
    """Paired t-test (same seeds, two samplers)."""
    r = scipy.stats.ttest_rel(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
    return dict(t=float(r.statistic), p=float(r.pvalue))

def bootstrap_ci(values, confidence=0.95, n_resamples=10000, seed=0):
    """Percentile-BCa bootstrap interval of the mean (scipy.stats.bootstrap)."""
    r = scipy.stats.bootstrap((np.asarray(values, dtype=np.float64),), np.mean, confidence_level=confidence,
                              n_resamples=n_resamples, random_state=np.random.default_rng(seed), method='BCa')
    return dict(low=float(r.confidence_interval.low), high=float(r.confidence_interval.high), confidence=confidence)

def read_values(path, column='fid'):
    """Numbers from a CSV (column `column`, or the only/last numeric column) or JSON (list, or list/dict keyed by `column`)."""
    if not os.path.isfile(path):
        raise ValueError(f'{path}: no such file')
    try:
        if path.endswith('.json'):
            with open(path) as f:
                data = json.load(f)
            if isinstance(data, dict):
                data = data[column]
            values = [float(d[column]) if isinstance(d, dict) else float(d) for d in data]
        else:
            with open(path, newline='') as f:
                rows = [r for r in csv.reader(f) if r and not r[0].startswith('#')]
            header = rows[0]
            if column in header:
                j = header.index(column)
                values = [float(r[j]) for r in rows[1:]]
            else:
                start = 0 if _is_number(rows[0][-1]) else 1
                values = [float(r[-1]) for r in rows[start:]]
    except (KeyError, ValueError, IndexError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f'{path}: cannot read numbers (column "{column}"): {type(e).__name__}; '
                         f'use a CSV with a "{column}" column or a JSON list') from None
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f'{path}: contains non-finite values')
    return values

def _is_number(s):
    try:
        float(s)
        return True
    except ValueError:
        return False

def report(a, b=None, baseline=None, confidence=0.95, seed=0, paired=False):
    """Everything the statistics command prints, as a dict."""
    out = dict(a=summarize(a) | dict(ci=bootstrap_ci(a, confidence, seed=seed)))
    if baseline is not None:
        out['one_sample'] = one_sample_t(a, baseline)
    if b is not None:
        out['b'] = summarize(b) | dict(ci=bootstrap_ci(b, confidence, seed=seed))
        out['welch'] = welch_t(a, b)
        if paired:
            if len(a) != len(b):
                raise ValueError(f'--paired needs equal counts, got {len(a)} and {len(b)}')
            out['paired'] = paired_t(a, b)
    return out
