"""Plain per-step PyTorch reference implementations.

Obviously-correct loops with the same signatures as ``fastrnn.functional``; the
tests compare the fused kernels against these and against torch.nn.
"""
import torch


def _steps(T, reverse):
    return range(T - 1, -1, -1) if reverse else range(T)


def _run(cell, gx, state, lengths, reverse, resets=None, zoneout=None):
    """Run ``cell(gx_t, state) -> (h, state)`` over time with per-sequence lengths.

    gx: [T, B, G*H] input projections of every step; state: tuple of [B, *] tensors,
    state[0] is h. Steps with t >= lengths[b] keep the state and emit zeros.
    resets: bool [T, B] or None; resets[t, b] starts a new episode at step t: the state
    entering step t (reversed: entering step t - 1) is the initial state again. Flags at
    padded steps are ignored. zoneout: None or one [T, B, *] tensor per state tensor, the
    weight z of each unit's previous value: state = z * previous + (1 - z) * new, and the
    output is the new h.
    """
    T, B = gx.shape[0], gx.shape[1]
    gxs = gx.unbind(0)  # one gradient node for all steps (x[t] would make one per step)
    ys = [None] * T
    initial = state
    for t in _steps(T, reverse):
        k = t + 1 if reverse else t  # the flag that decides whether step t starts afresh
        if resets is not None and k < T:
            flag = resets[k].to(gx.device)
            if lengths is not None:
                flag = flag & (k < lengths.to(gx.device))
            flag = flag.unsqueeze(1)
            state = tuple(torch.where(flag, i, s) for i, s in zip(initial, state))
        h_new, new_state = cell(gxs[t], state)
        if zoneout is not None:
            new_state = tuple(z[t] * o + (1 - z[t]) * n
                              for z, o, n in zip(zoneout, state, new_state))
            h_new = new_state[0]
        if lengths is not None:
            valid = (t < lengths.to(gx.device)).unsqueeze(1)
            new_state = tuple(torch.where(valid, n, o) for n, o in zip(new_state, state))
            h_new = torch.where(valid, h_new, torch.zeros_like(h_new))
        ys[t] = h_new
        state = new_state
    y = torch.stack(ys) if T > 0 else gx.new_zeros((0, B, state[0].shape[1]))
    return y, state


def _linear(x, w, b):
    out = x @ w.t()
    return out if b is None else out + b


def _fed(h, rec_mask):
    """The h that feeds W_hh: with recurrent dropout, h * rec_mask ([B, P], fixed in time)."""
    return h if rec_mask is None else h * rec_mask


def lstm(x, h0, c0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False, w_hr=None, *,
         resets=None, zoneout_h=None, zoneout_c=None, rec_mask=None):
    def cell(gxt, state):
        h, c = state
        gates = gxt + _linear(_fed(h, rec_mask), w_hh, b_hh)
        i, f, g, o = gates.chunk(4, 1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        if w_hr is not None:
            h_new = h_new @ w_hr.t()
        return h_new, (h_new, c_new)

    zoneout = None if zoneout_h is None else (zoneout_h, zoneout_c)
    y, (h, c) = _run(cell, _linear(x, w_ih, b_ih), (h0, c0), lengths, reverse, resets, zoneout)
    return y, h, c


def gru(x, h0, w_ih, w_hh, b_ih, b_hh, lengths=None, reverse=False, *, resets=None,
        zoneout_h=None, rec_mask=None):
    def cell(gxt, state):
        (h,) = state
        gx_r, gx_z, gx_n = gxt.chunk(3, 1)
        gh_r, gh_z, gh_n = _linear(_fed(h, rec_mask), w_hh, b_hh).chunk(3, 1)
        r = torch.sigmoid(gx_r + gh_r)
        z = torch.sigmoid(gx_z + gh_z)
        n = torch.tanh(gx_n + r * gh_n)
        h_new = (1 - z) * n + z * h
        return h_new, (h_new,)

    zoneout = None if zoneout_h is None else (zoneout_h,)
    y, (h,) = _run(cell, _linear(x, w_ih, b_ih), (h0,), lengths, reverse, resets, zoneout)
    return y, h


def rnn(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity="tanh", lengths=None, reverse=False, *,
        resets=None, zoneout_h=None, rec_mask=None):
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
    act = torch.tanh if nonlinearity == "tanh" else torch.relu

    def cell(gxt, state):
        (h,) = state
        h_new = act(gxt + _linear(_fed(h, rec_mask), w_hh, b_hh))
        return h_new, (h_new,)

    zoneout = None if zoneout_h is None else (zoneout_h,)
    y, (h,) = _run(cell, _linear(x, w_ih, b_ih), (h0,), lengths, reverse, resets, zoneout)
    return y, h


def _ln(v, w, b, eps):
    """Layer norm over the last dimension (the whole gate vector of a row)."""
    return torch.nn.functional.layer_norm(v, v.shape[-1:], w, b, eps)


def _ln_input(x, w_ih, b, ln_w, ln_b, eps):
    """The LayerNorm cells' input parts: LN_ih(x W_ih^T) (+ b)."""
    gx = _ln(x @ w_ih.t(), ln_w, ln_b, eps)
    return gx if b is None else gx + b


def _ln_lstm_steps(gx, h0, c0, w_hh, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b, lengths, reverse, eps,
                   resets, zoneout_h, zoneout_c, rec_mask):
    def cell(gxt, state):
        h, c = state
        gates = gxt + _ln(_fed(h, rec_mask) @ w_hh.t(), ln_hh_w, ln_hh_b, eps)
        i, f, g, o = gates.chunk(4, 1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(_ln(c_new, ln_c_w, ln_c_b, eps))
        return h_new, (h_new, c_new)

    zoneout = None if zoneout_h is None else (zoneout_h, zoneout_c)
    y, (h, c) = _run(cell, gx, (h0, c0), lengths, reverse, resets, zoneout)
    return y, h, c


def _ln_gru_steps(gx, h0, w_hh, b_hh, ln_hh_w, ln_hh_b, lengths, reverse, eps, resets,
                  zoneout_h, rec_mask):
    def cell(gxt, state):
        (h,) = state
        gh = _ln(_fed(h, rec_mask) @ w_hh.t(), ln_hh_w, ln_hh_b, eps)
        gh = gh if b_hh is None else gh + b_hh
        gx_r, gx_z, gx_n = gxt.chunk(3, 1)
        gh_r, gh_z, gh_n = gh.chunk(3, 1)
        r = torch.sigmoid(gx_r + gh_r)
        z = torch.sigmoid(gx_z + gh_z)
        n = torch.tanh(gx_n + r * gh_n)
        h_new = (1 - z) * n + z * h
        return h_new, (h_new,)

    zoneout = None if zoneout_h is None else (zoneout_h,)
    y, (h,) = _run(cell, gx, (h0,), lengths, reverse, resets, zoneout)
    return y, h


def ln_lstm(x, h0, c0, w_ih, w_hh, bias, ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b,
            lengths=None, reverse=False, *, eps=1e-5, resets=None, zoneout_h=None,
            zoneout_c=None, rec_mask=None):
    """LayerNorm LSTM (Ba et al. 2016), gates i, f, g, o:
    gates = LN_ih(x W_ih^T) + LN_hh(h W_hh^T) + bias; c' = sig(f) c + sig(i) tanh(g);
    h' = sig(o) tanh(LN_c(c')). Each LN runs over the whole vector of one row (4H or H)."""
    return _ln_lstm_steps(_ln_input(x, w_ih, bias, ln_ih_w, ln_ih_b, eps), h0, c0, w_hh,
                          ln_hh_w, ln_hh_b, ln_c_w, ln_c_b, lengths, reverse, eps, resets,
                          zoneout_h, zoneout_c, rec_mask)


def ln_gru(x, h0, w_ih, w_hh, b_ih, b_hh, ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, lengths=None,
           reverse=False, *, eps=1e-5, resets=None, zoneout_h=None, rec_mask=None):
    """LayerNorm GRU, gates r, z, n: a = LN_ih(x W_ih^T) + b_ih, b = LN_hh(h W_hh^T) + b_hh;
    r = sig(a_r + b_r), z = sig(a_z + b_z), n = tanh(a_n + r b_n), h' = (1 - z) n + z h."""
    return _ln_gru_steps(_ln_input(x, w_ih, b_ih, ln_ih_w, ln_ih_b, eps), h0, w_hh, b_hh,
                         ln_hh_w, ln_hh_b, lengths, reverse, eps, resets, zoneout_h, rec_mask)


def ln_recurrence(cell, gx, h0, c0, w_hh, b_hh, ln_w, ln_b, lnc_w, lnc_b, gx_w, gx_b, lengths,
                  reverse, eps, resets=None, zoneout_h=None, zoneout_c=None, rec_mask=None):
    """The recurrence of ``fastrnn::ln_forward`` (same arguments): gx [T, B, D*G*H] holds
    the normalised input projections of every direction side by side, and the input parts
    are gx * gx_w + gx_b; the rest are stacked on a leading [D] axis. Returns (y, h_n,
    c_n or None)."""
    D, GH = w_hh.shape[0], w_hh.shape[1]
    ys, hs, cs = [], [], []
    pick = lambda t, d: None if t is None else t[d]  # noqa: E731
    for d in range(D):
        gxd, rev = gx[..., d * GH:(d + 1) * GH] * gx_w[d] + gx_b[d], reverse != (d == 1)
        if cell == "lstm":
            y, h, c = _ln_lstm_steps(gxd, h0[d], c0[d], w_hh[d], ln_w[d], ln_b[d], lnc_w[d],
                                     lnc_b[d], lengths, rev, eps, resets, pick(zoneout_h, d),
                                     pick(zoneout_c, d), pick(rec_mask, d))
            cs.append(c)
        else:
            y, h = _ln_gru_steps(gxd, h0[d], w_hh[d], pick(b_hh, d), ln_w[d], ln_b[d], lengths,
                                 rev, eps, resets, pick(zoneout_h, d), pick(rec_mask, d))
        ys.append(y)
        hs.append(h)
    return torch.cat(ys, 2), torch.stack(hs), (torch.stack(cs) if cs else None)


def ln_layer(cell, x, h0, c0, weights, lengths=None, reverse=False, *, eps=1e-5, resets=None,
             zoneout_h=None, zoneout_c=None, rec_mask=None):
    """All directions of one LayerNorm layer, as ``fastrnn.functional.ln_layer``.

    cell: 'lstm' or 'gru'. weights: one tuple per direction, (w_ih, w_hh, b_ih, b_hh,
    ln_ih_w, ln_ih_b, ln_hh_w, ln_hh_b, ln_c_w, ln_c_b): for 'lstm' b_ih is the one bias
    (or None), b_hh is None and ln_c_* [H] are LN_c's; for 'gru' ln_c_* are None. Other
    arguments and the result as ``layer``.
    """
    ys, hs, cs = [], [], []
    pick = lambda t, d: None if t is None else t[d]  # noqa: E731
    for d, (w_ih, w_hh, b_ih, b_hh, lw_ih, lb_ih, lw_hh, lb_hh, lw_c, lb_c) in enumerate(weights):
        rev = reverse != (d == 1)
        kw = dict(eps=eps, resets=resets, zoneout_h=pick(zoneout_h, d), rec_mask=pick(rec_mask, d))
        if cell == "lstm":
            y, h, c = ln_lstm(x, h0[d], c0[d], w_ih, w_hh, b_ih, lw_ih, lb_ih, lw_hh, lb_hh, lw_c,
                              lb_c, lengths, rev, zoneout_c=pick(zoneout_c, d), **kw)
            cs.append(c)
        else:
            y, h = ln_gru(x, h0[d], w_ih, w_hh, b_ih, b_hh, lw_ih, lb_ih, lw_hh, lb_hh, lengths,
                          rev, **kw)
        ys.append(y)
        hs.append(h)
    return torch.cat(ys, 2), torch.stack(hs), (torch.stack(cs) if cs else None)


def layer(cell, x, h0, c0, weights, lengths=None, reverse=False, *, resets=None,
          zoneout_h=None, zoneout_c=None, rec_mask=None):
    """All directions of one layer, as ``fastrnn.functional.layer`` (same arguments).

    cell: 'lstm', 'gru', 'rnn_tanh' or 'rnn_relu'; h0 [D, B, P]; c0 [D, B, H] (LSTM) or
    None; weights: one (w_ih, w_hh, b_ih, b_hh, w_hr) tuple per direction. Direction 1
    runs reversed. zoneout_h [D, T, B, P], zoneout_c [D, T, B, H]: zoneout weights per
    direction (see _run), or None; rec_mask [D, B, P]: recurrent dropout masks. Returns (y [T, B, D*P], h_n [D, B, P], c_n [D, B, H] or None).
    """
    ys, hs, cs = [], [], []
    pick = lambda t, d: None if t is None else t[d]  # noqa: E731
    for d, (w_ih, w_hh, b_ih, b_hh, w_hr) in enumerate(weights):
        rev = reverse != (d == 1)
        if cell == "lstm":
            y, h, c = lstm(x, h0[d], c0[d], w_ih, w_hh, b_ih, b_hh, lengths, rev, w_hr,
                           resets=resets, zoneout_h=pick(zoneout_h, d),
                           zoneout_c=pick(zoneout_c, d), rec_mask=pick(rec_mask, d))
            cs.append(c)
        elif cell == "gru":
            y, h = gru(x, h0[d], w_ih, w_hh, b_ih, b_hh, lengths, rev, resets=resets,
                       zoneout_h=pick(zoneout_h, d), rec_mask=pick(rec_mask, d))
        else:
            y, h = rnn(x, h0[d], w_ih, w_hh, b_ih, b_hh, cell[4:], lengths, rev, resets=resets,
                       zoneout_h=pick(zoneout_h, d), rec_mask=pick(rec_mask, d))
        ys.append(y)
        hs.append(h)
    return torch.cat(ys, 2), torch.stack(hs), (torch.stack(cs) if cs else None)
