// Refuses regular expressions that can backtrack catastrophically (exponential time), before they run.
//
// tokenizer.json files come from the internet, and the `Split` pre-tokenizer and the `Replace` normalizer /
// pre-tokenizer / decoder carry regexes that @huggingface/tokenizers compiles with V8's backtracking engine:
// `(a+)+b` takes 0.6 s on 26 characters and doubles with each one more. Why a static check and not a
// linear-time engine: the patterns real models ship (GPT-2, Llama 3, Qwen2, o200k) need lookahead
// (`\s+(?!\S)`), which RE2-style engines (re2, re2-wasm, re2js) do not have, and V8's own linear engine
// (--enable-experimental-regexp-engine*) supports neither lookaround nor the `u` flag the library compiles
// with — an engine swap would refuse exactly the tokenizers we must load. So the compiled pattern is
// analysed instead, with scslre (the analysis behind eslint-plugin-regexp's no-super-linear-backtracking,
// on the maintained @eslint-community/regexpp parser), and refused when:
//   - scslre finds an exponential backtracking path (a quantifier that can match the same input in
//     exponentially many ways: `(a+)+`, `(a*)*`, `(\w+\s?)+`);
//   - an unbounded quantifier repeats a part of variable length and scslre flags it as super-linear
//     (`(\w{1,3})*`, `(a?b?)*`: scslre rates these polynomial, they are exponential);
//   - an unbounded quantifier repeats an alternation whose alternatives can start with the same character
//     (`(a|a)*`, `(\d|\w)+`: scslre reports these only as polynomial, but ambiguity under a star is
//     exponential); conservative: it may refuse a safe pattern like `(ab|ac)*`, which no real tokenizer has;
//   - any repetition, bounded or not, repeats a part holding an unbounded quantifier (`((x*){1,3}){1,3}`:
//     degree 9 — found by the fuzz in test/formats/tokenizer-regex.test.ts: 257 s on 29 characters);
//   - three or more unbounded quantifiers in one alternative can consume the same character (`a*a*a*b`:
//     at least cubic);
//   - it has backreferences (not regular; no tokenizer needs them).
// Quadratic cases are accepted: GPT-2's own `\s+(?!\S)|\s+` is quadratic on a long run of spaces, and
// every byte-level tokenizer uses it.
import { RegExpParser, visitRegExpAST, type AST } from '@eslint-community/regexpp';
import { getFirstConsumedChar } from 'regexp-ast-analysis';
import { analyse } from 'scslre';

const parser = new RegExpParser({ ecmaVersion: 2025 });

/** Why `source` (with `flags`) can backtrack catastrophically, naming the part; null when it cannot. */
export function catastrophicBacktracking(source: string, flags: string): string | null {
  let ast: AST.RegExpLiteral;
  try {
    ast = parser.parseLiteral(`/${source}/${flags}`);
  } catch (e) {
    // V8 compiled it, so this parser should too; refusing is the safe side (the message says why).
    return `it could not be analysed (${(e as Error).message})`;
  }
  const reports = analyse(ast, { reportTypes: { Move: true, Self: true, Trade: true } }).reports;
  const exponential = reports.find((r) => r.exponential);
  if (exponential) {
    const q = exponential.type === 'Trade' ? exponential.startQuant : exponential.quant;
    return `'${q.raw}' can match the same text in exponentially many ways (e.g. ${JSON.stringify(exponential.character.pick)} repeated, then no match)`;
  }
  const superLinear = new Set<AST.Node>(reports.map((r) => (r.type === 'Trade' ? r.startQuant : r.quant)));
  let why: string | null = null;
  visitRegExpAST(ast, {
    onBackreferenceEnter(b) { why ??= `it uses the backreference ${b.raw} (not supported in tokenizer patterns)`; },
    onQuantifierEnter(q) {
      if (why || q.max <= 1) return;
      const el = q.element;
      // Repetition (even bounded: {1,3}) of a part that holds an unbounded quantifier multiplies the degree of
      // the backtracking polynomial with each level: ((x*){1,3}){1,3} is x* nine times over.
      let innerStar: AST.Quantifier | undefined;
      visitRegExpAST(el as unknown as AST.Pattern, { onQuantifierEnter(inner) { if (inner.max === Infinity) innerStar ??= inner; } });
      if (innerStar) { why = `'${q.raw}' repeats '${innerStar.raw}': nested repetition can match the same text in exponentially (or highly polynomially) many ways`; return; }
      if (q.max !== Infinity) return;
      // A repetition of something that itself varies in length, which scslre flags as super-linear where it
      // stands: the same text splits into iterations in exponentially many ways ((\w{1,3})*, (a?b?)*).
      // (scslre rates these polynomial; the fuzz in test/formats/tokenizer-regex.test.ts found them.)
      let varies = false;
      visitRegExpAST(el as unknown as AST.Pattern, { onQuantifierEnter(inner) { if (inner.min !== inner.max) varies = true; } });
      if (varies && superLinear.has(q)) { why = `'${q.raw}' repeats a variable-length part: the same text splits into iterations in exponentially many ways`; return; }
      const alts = el.type === 'Group' || el.type === 'CapturingGroup' ? el.alternatives : [];
      for (let i = 0; i < alts.length && !why; i++) {
        const a = getFirstConsumedChar(alts[i], 'ltr', ast.flags);
        for (let j = i + 1; j < alts.length && !why; j++) {
          const b = getFirstConsumedChar(alts[j], 'ltr', ast.flags);
          if (!a.char.isDisjointWith(b.char)) why = `'${q.raw}' repeats alternatives ('${alts[i].raw}', '${alts[j].raw}') that can match the same text: exponential backtracking`;
        }
      }
    },
  });
  if (why) return why;
  // Three or more unbounded quantifiers that can consume the same character, in one top-level alternative,
  // make backtracking at least cubic (a*a*a*b): on a long record that is as bad as exponential.
  for (const alt of ast.pattern.alternatives) {
    const stars: { raw: string; chars: ReturnType<typeof getFirstConsumedChar>['char'] }[] = [];
    visitRegExpAST(alt as unknown as AST.Pattern, { onQuantifierEnter(q) { if (q.max === Infinity) stars.push({ raw: q.raw, chars: getFirstConsumedChar(q.element, 'ltr', ast.flags).char }); } });
    for (let i = 0; i < stars.length; i++) for (let j = i + 1; j < stars.length; j++) for (let k = j + 1; k < stars.length; k++) {
      const ij = stars[i].chars.intersect(stars[j].chars);
      if (!ij.isEmpty && !ij.isDisjointWith(stars[k].chars)) return `'${stars[i].raw}', '${stars[j].raw}' and '${stars[k].raw}' can all consume the same characters: backtracking at least cubic in the text length`;
    }
  }
  return null;
}
