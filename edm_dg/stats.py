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

def read_values(path, column='fid', option='--a', min_count=2):
    """The numbers of one group: column `column` of a CSV with a header row, or a JSON list
    (of numbers, or of objects with key `column`) or object with key `column`.

    Nothing is guessed: a missing column or key, a cell that is not a number,
    or fewer than `min_count` values is a ValueError naming the file (given as
    `option`) and the fix.
    """
    if not os.path.isfile(path):
        raise ValueError(f'{path}: no such file; check {option}')
    if path.lower().endswith('.json'):
        values = _json_values(path, column, option)
    elif path.lower().endswith(('.csv', '.txt')):
        values = _csv_values(path, column, option)
    else:
        raise ValueError(f'{path}: unknown file type; pass {option} as a .csv with a "{column}" column or a .json list')
    if len(values) < min_count:
        raise ValueError(f'{path}: {len(values)} value(s) in "{column}", need at least {min_count} values for a spread; '
                         f'pass {option} with more runs')
    return values

def _number(value, path, where, option):
    """A finite float from a CSV cell or JSON value; refuses text, booleans, NaN and infinities."""
    bad = isinstance(value, bool) or not isinstance(value, (int, float, str))
    try:
        v = float(value) if not bad else None
    except ValueError:
        v = None
    if v is None:
        raise ValueError(f'{path}: {where}: {str(value)[:40]!r} is not a number; fix {option} or choose another --column')
    if not math.isfinite(v):
        raise ValueError(f'{path}: {where}: contains non-finite value {value!r}; drop that run from {option}')
    return v

def _csv_values(path, column, option):
    try:
        with open(path, newline='') as f:
            rows = [(i, r) for i, r in enumerate(csv.reader(f), 1) if r and not r[0].lstrip().startswith('#')]
    except (UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f'{path}: not a text CSV ({type(e).__name__}); pass {option} as a CSV with a "{column}" column') from None
    if not rows:
        raise ValueError(f'{path}: empty; {option} needs a CSV with a header row and a "{column}" column')
    header = [h.strip() for h in rows[0][1]]
    if column not in header:
        shown = ', '.join(f'"{h}"' for h in header[:20])
        raise ValueError(f'{path}: no column "{column}" in the header row of {option} (columns: {shown}); '
                         f'pass --column=NAME, or add a header row with "{column}"')
    j = header.index(column)
    values = []
    for line, r in rows[1:]:
        if j >= len(r) or not r[j].strip():
            raise ValueError(f'{path}: line {line}: no "{column}" value; fill it in or drop the line from {option}')
        values.append(_number(r[j].strip(), path, f'line {line}, column "{column}"', option))
    return values

def _json_values(path, column, option):
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f'{path}: not valid JSON ({type(e).__name__}); pass {option} as a JSON list or a CSV') from None
    if isinstance(data, dict):
        if column not in data:
            raise ValueError(f'{path}: no key "{column}" in {option} (keys: {", ".join(map(repr, list(data)[:20]))}); pass --column=KEY')
        data = data[column]
    if not isinstance(data, list):
        raise ValueError(f'{path}: expected a JSON list or an object with a "{column}" list, got {type(data).__name__}; '
                         f'fix {option}')
    values = []
    for i, d in enumerate(data):
        if isinstance(d, dict):
            if column not in d:
                raise ValueError(f'{path}: item {i} of {option} has no key "{column}" (keys: {", ".join(map(repr, list(d)[:20]))}); pass --column=KEY')
            d = d[column]
        values.append(_number(d, path, f'item {i}', option))
    return values

def report(a, b=None, baseline=None, confidence=0.95, seed=0, paired=False):
    """Everything the statistics command prints, as a dict."""
    if baseline is not None and not math.isfinite(baseline):
        raise ValueError(f'--baseline={baseline} is not a finite number')
    if paired and b is None:
        raise ValueError('--paired compares two groups; pass --b too')
    if paired and len(a) != len(b):
        raise ValueError(f'--paired needs the same runs in --a and --b, got {len(a)} and {len(b)} values; '
                         f'drop --paired or pass matching files')
    out = dict(a=summarize(a) | dict(ci=bootstrap_ci(a, confidence, seed=seed)))
    if baseline is not None:
        out['one_sample'] = one_sample_t(a, baseline)
    if b is not None:
        out['b'] = summarize(b) | dict(ci=bootstrap_ci(b, confidence, seed=seed))
        out['welch'] = welch_t(a, b)
        if paired:
            out['paired'] = paired_t(a, b)
    return out
