<%doc>
The builtins the kernels call in their loops, as netcl_fma, netcl_sqrt,
netcl_fabs, netcl_fmax, netcl_fmin and netcl_select.

PoCL (3.0, CPU devices) links its builtin library without inlining it
whenever the library was built for a CPU feature the host lacks (a virtual
machine that hides rdrnd is enough): every fma, sqrt or fmax is then a call,
around which the compiler spills every live vector to the stack — two to
four times the cost of an update's arithmetic. With NETCL_INLINE_MATH
(defined by netcl._kernels.build_options for PoCL's CPU devices) these are
clang builtins, which become LLVM intrinsics and so instructions, applied
lane by lane: LLVM's SLP vectoriser re-forms the vector instruction.
netcl_select(a, b, c) is then C's ?: on vectors (MSB of c, as select).
Elsewhere they are the OpenCL builtins (Oclgrind 21.10 computes some
vector ?: and comparison-as-integer expressions wrongly; select it gets
right). The results are the same IEEE results either way: fma is fused
(llvm.fma; a correctly rounded library call on a CPU without FMA), sqrt
correctly rounded, the rest exact.

declare(types, widths) emits them for the OpenCL C scalar types and
vector widths a kernel uses.
</%doc>
<%!
    def lanes_of(T, width, call, *operands):
        if width == 1:
            return "%s(%s)" % (call, ", ".join(operands))
        return "(%s)(%s)" % (T, ", ".join(
            "%s(%s)" % (call, ", ".join("%s.s%x" % (a, j) for a in operands))
            for j in range(width)))

    FUNCTIONS = (("fma", ("a", "b", "c")), ("sqrt", ("a",)), ("fabs", ("a",)),
                 ("fmax", ("a", "b")), ("fmin", ("a", "b")))
%>
<%def name="declare(types, widths)">
#ifdef NETCL_INLINE_MATH
% for t in types:
  % for width in widths:
<%
    T = t if width == 1 else "%s%d" % (t, width)
    suffix = "f" if t == "float" else ""
%>\
    % for name, operands in FUNCTIONS:
__attribute__((overloadable, always_inline)) ${T} netcl_${name}(${", ".join("%s %s" % (T, a) for a in operands)})
{
    return ${lanes_of(T, width, "__builtin_" + name + suffix, *operands)};
}
    % endfor
  % endfor
% endfor
#define netcl_select(a, b, c) ((c) ? (b) : (a))
#else
% for name, operands in FUNCTIONS:
#define netcl_${name} ${name}
% endfor
#define netcl_select select
#endif
</%def>
