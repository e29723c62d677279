"""Chebyshev graph encoder q(z | x, graph) (paper 001, Sec. 3.2.1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn import ChebConv

from ._csr import entry_rows

# the largest dense (rows, genes) matrix _SparseRowsTimesWeight builds for its backward pass
# (64 MiB of float32): a training step's seed cells, 128 x 13,713 genes of PBMC3K, are 1.8M
_DENSE_BACKWARD_MAX = 2**24


class _SparseRowsTimesWeight(torch.autograd.Function):
    r""":math:`X W` for CSR rows :math:`X` (``crow``, ``col``, ``value``) and a dense
    :math:`W` (genes, hidden), differentiable in :math:`W` only.

    The forward pass is ``embedding_bag``'s weighted sum. The backward pass writes
    :math:`X` out densely and takes :math:`X^\top G` as one matrix product. For 128 cells
    of 13,713 genes, 900 entries a cell and 128 hidden units, the forward and backward
    passes took 4.4-5.3 ms on 2 CPU cores against 11.7 ms with ``embedding_bag``'s own
    backward, which sorts the entries by gene and accumulates them row by row. Repeated
    entries of a row add up, as in the forward pass.
    """

    @staticmethod
    def forward(ctx, weight: Tensor, crow: Tensor, col: Tensor, value: Tensor) -> Tensor:
        ctx.save_for_backward(crow, col, value)
        ctx.weight_shape, ctx.weight_dtype = weight.shape, weight.dtype
        return F.embedding_bag(col, weight, crow[:-1], mode="sum", per_sample_weights=value)

    @staticmethod
    def backward(ctx, grad: Tensor):
        crow, col, value = ctx.saved_tensors
        n_rows = crow.shape[0] - 1
        rows = entry_rows(crow, col.shape[0])
        # in the weight's precision, whatever autocast made of the forward pass's output
        dense = grad.new_zeros(n_rows, ctx.weight_shape[0], dtype=ctx.weight_dtype)
        dense.index_put_((rows, col), value.to(ctx.weight_dtype), accumulate=True)
        return torch.mm(dense.t(), grad.to(ctx.weight_dtype)), None, None, None


class FullGraphChebConv(ChebConv):
    r""":class:`~torch_geometric.nn.conv.ChebConv` on a subgraph with the full graph's degrees.

    With the symmetric normalised Laplacian and :math:`\lambda_{\max} = 2`, the scaled
    Laplacian is :math:`\hat L = -D^{-1/2} W D^{-1/2}` and

    .. math::
        X' = \sum_{k=1}^{K} T_k(\hat L)\, X\, \Theta^{(k)}.

    :class:`~torch_geometric.nn.conv.ChebConv` would take the degrees :math:`D` from the
    subgraph's own edges, which differ from the full graph's for cells on the subgraph's
    border. Here the degree of each node is the sum of its (possibly perturbed) edge weights
    inside the subgraph plus ``degree_outside``, so a seed cell whose (K-1)-hop
    neighbourhood lies in the subgraph gets exactly its full-graph output, and a perturbation
    of the weights moves the degrees consistently.

    Shapes:
        - **input:** node features :math:`(|V|, F_{in})`, edge indices :math:`(2, |E|)`
          (both directions of each edge), edge weights :math:`(|E|)`, ``degree_outside``
          :math:`(|V|)`
        - **output:** node features :math:`(|V|, F_{out})`
    """

    def forward(  # type: ignore[override]
        self, x: Tensor, edge_index: Tensor, edge_weight: Tensor, degree_outside: Tensor,
        n_out: int | None = None,
        n_out_edges: int | None = None,
    ) -> Tensor:
        """``n_out``: return only the first ``n_out`` nodes' outputs. With ``K <= 2`` only
        the edges into those nodes then carry messages (the degrees still come from all
        edges), which is what a subgraph batch needs for its seed cells.
        ``n_out_edges``: those edges are the first ``n_out_edges`` (edges listed by
        destination in node order, as :class:`~scldiff.graph.SubgraphSampler` lists
        them); without it they are found by a mask, whose selection on a GPU waits for
        the device."""
        degree = degree_outside.index_add(0, edge_index[1], edge_weight)
        inv_sqrt = degree.clamp_min(torch.finfo(degree.dtype).tiny).rsqrt()
        norm = -edge_weight * inv_sqrt[edge_index[0]] * inv_sqrt[edge_index[1]]
        if n_out is not None and len(self.lins) <= 2:
            x_out = x[:n_out]
            out = self.lins[0](x_out)
            if len(self.lins) > 1:
                into = edge_index[1] < n_out if n_out_edges is None else slice(n_out_edges)
                tx_1 = self.propagate(edge_index[:, into], x=(x, x_out), norm=norm[into],
                                      size=(x.shape[0], n_out))
                out = out + self.lins[1](tx_1)
            return out if self.bias is None else out + self.bias
        if n_out is not None:
            return self.forward(x, edge_index, edge_weight, degree_outside)[:n_out]
        tx_0, tx_1 = x, x
        out = self.lins[0](tx_0)
        if len(self.lins) > 1:
            tx_1 = self.propagate(edge_index, x=x, norm=norm)
            out = out + self.lins[1](tx_1)
        for lin in self.lins[2:]:
            tx_2 = 2.0 * self.propagate(edge_index, x=tx_1, norm=norm) - tx_0
            out = out + lin(tx_2)
            tx_0, tx_1 = tx_1, tx_2
        if self.bias is not None:
            out = out + self.bias
        return out


class GraphEncoder(nn.Module):
    r"""Chebyshev GNN on [log-normalised expression, LPE] :math:`\to (\mu, \log\sigma^2)`.

    The expression enters through a linear projection computed sparsely
    (:func:`torch.nn.functional.embedding_bag` over the stored counts, cost
    :math:`O(\mathrm{nnz} \cdot H)`), which is the first Chebyshev term's weight applied
    before propagation: since :math:`T_k(\hat L)` acts on cells and :math:`\Theta` on
    features, :math:`T_k(\hat L) X \Theta = T_k(\hat L)(X\Theta)`.

    Parameters
    ----------
    n_input
        Number of genes.
    n_lpe
        Number of Laplacian positional encodings (0 to use none).
    n_latent
        Latent dimension.
    n_hidden
        Hidden width.
    cheb_k
        Chebyshev filter size K of each graph layer (K - 1 hops).
    n_layers
        Number of graph layers; the receptive field is ``n_layers * (cheb_k - 1)`` hops.
    dropout_rate
        Dropout after each hidden layer.
    neighbour_gradients
        In training, the input projection is computed exactly for every node, but by
        default the backward pass goes through it only for the seed cells (the first
        ``n_seed`` nodes); the neighbours' projections are treated as constants, as
        GNNAutoScale does with its historical embeddings (Fey et al., 2021). The projection
        of the ~15x more neighbours dominates the cost of a step otherwise. ``True``
        back-propagates through all nodes.
    n_labels
        With ``n_labels > 0`` the encoder also reads each encoded cell's label, as a
        conditional VAE's does: a learned vector per label is added to the last hidden
        layer, so the label shifts the posterior's mean and log-variance (initially by
        zero). ``forward`` then needs the label codes of the cells it encodes.
    """

    def __init__(
        self,
        n_input: int,
        n_lpe: int,
        n_latent: int,
        n_hidden: int = 128,
        cheb_k: int = 2,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        neighbour_gradients: bool = False,
        n_labels: int = 0,
    ):
        super().__init__()
        self.neighbour_gradients = neighbour_gradients
        if cheb_k < 1 or n_layers < 1:
            raise ValueError("GraphEncoder needs cheb_k >= 1 and n_layers >= 1.")
        self.cheb_k = cheb_k  # 1: each cell alone, the edges unused
        self.n_lpe = n_lpe
        self.expression = nn.EmbeddingBag(n_input, n_hidden, mode="sum")
        self.expression_bias = nn.Parameter(torch.zeros(n_hidden))
        self.lpe = nn.Linear(n_lpe, n_hidden, bias=False) if n_lpe > 0 else None
        self.input_norm = nn.LayerNorm(n_hidden)
        self.convs = nn.ModuleList(
            [FullGraphChebConv(n_hidden, n_hidden, K=cheb_k) for _ in range(n_layers)]
        )
        self.norms = nn.ModuleList([nn.LayerNorm(n_hidden) for _ in range(n_layers)])
        self.dropout = nn.Dropout(dropout_rate)
        self.mean = nn.Linear(n_hidden, n_latent)
        self.logvar = nn.Linear(n_hidden, n_latent)
        nn.init.normal_(self.expression.weight, std=n_input**-0.5)
        self.label_embedding = nn.Embedding(n_labels, n_hidden) if n_labels > 0 else None
        if self.label_embedding is not None:
            nn.init.zeros_(self.label_embedding.weight)

    def project(self, crow: Tensor, col: Tensor, value: Tensor) -> Tensor:
        """Sparse ``X @ W + b`` over CSR rows (a weighted embedding-bag sum): the input
        projection of each cell, which depends on that cell's expression alone. With a
        gradient to compute for ``W`` alone, and the rows' dense form at most
        ``_DENSE_BACKWARD_MAX`` entries, the backward pass is the dense product of
        :class:`_SparseRowsTimesWeight` instead of ``embedding_bag``'s."""
        weight = self.expression.weight
        if torch.is_grad_enabled() and weight.requires_grad and not value.requires_grad \
                and (crow.shape[0] - 1) * weight.shape[0] <= _DENSE_BACKWARD_MAX:
            h = _SparseRowsTimesWeight.apply(weight, crow, col, value)
        else:
            h = F.embedding_bag(col, weight, crow[:-1], mode="sum", per_sample_weights=value)
        return h + self.expression_bias

    @property
    def n_hops(self) -> int:
        """Receptive field in hops: subgraphs of this depth make seed encodings exact."""
        return sum(len(conv.lins) - 1 for conv in self.convs)

    def forward(
        self,
        crow: Tensor,
        col: Tensor,
        value: Tensor,
        lpe: Tensor | None,
        edge_index: Tensor,
        edge_weight: Tensor,
        degree_outside: Tensor,
        n_seed: int | None = None,
        labels: Tensor | None = None,
        n_seed_entries: int | None = None,
        n_seed_edges: int | None = None,
        projection: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Encode the nodes (only the first ``n_seed`` with ``n_seed``, see
        :meth:`forward_projected`); ``(crow, col, value)`` is the CSR input matrix.
        ``n_seed_entries``: the number of stored entries of the seed rows,
        ``crow[n_seed]``, if the caller knows it (read from ``crow`` otherwise, which on a
        GPU waits for the device). ``n_seed_edges``: see :meth:`forward_projected`.
        ``projection``: the nodes' input projection (:meth:`project_nodes`) if computed
        already; ``crow``, ``col`` and ``value`` are then not read."""
        h = self.project_nodes(crow, col, value, n_seed, n_seed_entries) \
            if projection is None else projection
        return self.forward_projected(h, lpe, edge_index, edge_weight, degree_outside, n_seed,
                                      labels, n_seed_edges)

    def project_nodes(self, crow: Tensor, col: Tensor, value: Tensor,
                      n_seed: int | None = None, n_seed_entries: int | None = None
                      ) -> Tensor:
        """The input projection (:meth:`project`) of a batch's nodes, as :meth:`forward`
        computes it: in training, unless ``neighbour_gradients``, only the first ``n_seed``
        rows (the seed cells) carry gradients. ``n_seed_entries``: see :meth:`forward`."""
        if self.training and not self.neighbour_gradients and n_seed is not None:
            split = int(crow[n_seed]) if n_seed_entries is None else n_seed_entries
            seeds = self.project(crow[: n_seed + 1], col[:split], value[:split])
            with torch.no_grad():
                others = self.project(crow[n_seed:] - split, col[split:], value[split:])
            return torch.cat([seeds, others])
        return self.project(crow, col, value)

    def forward_projected(
        self,
        projection: Tensor,
        lpe: Tensor | None,
        edge_index: Tensor,
        edge_weight: Tensor,
        degree_outside: Tensor,
        n_seed: int | None = None,
        labels: Tensor | None = None,
        n_seed_edges: int | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Encode from the nodes' input projections (:meth:`project`), so that a pass over
        many subgraphs projects each cell's expression once, not once per subgraph.

        With ``n_seed``, only the first ``n_seed`` nodes (the seed cells) are encoded: the
        last graph layer computes just their outputs. Otherwise every node is encoded.
        ``labels``: the label codes of the encoded cells (the seeds, or every node), needed
        when the encoder reads labels (``n_labels > 0``) and ignored otherwise.
        ``n_seed_edges``: the number of edges into the seed cells, which come first
        (:class:`~scldiff.graph.SubgraphSampler`'s order), so that the last layer takes
        them as a prefix rather than by a mask (:meth:`FullGraphChebConv.forward`).
        """
        h = projection
        if self.lpe is not None and lpe is not None:
            h = h + self.lpe(lpe)
        h = self.dropout(F.gelu(self.input_norm(h)))
        last = len(self.convs) - 1
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            h = conv(h, edge_index, edge_weight, degree_outside,
                     n_out=n_seed if i == last else None,
                     n_out_edges=n_seed_edges if i == last else None)
            h = self.dropout(F.gelu(norm(h)))
        if self.label_embedding is not None:
            if labels is None:
                raise ValueError("this encoder reads the cells' labels (n_labels > 0): pass "
                                 "their codes as `labels`.")
            labels = labels.reshape(-1).long()
            if labels.shape[0] != h.shape[0]:
                raise ValueError(f"`labels` has {labels.shape[0]} codes for {h.shape[0]} "
                                 "encoded cells.")
            h = h + self.label_embedding(labels)
        return self.mean(h), self.logvar(h).clamp(-12.0, 8.0)
