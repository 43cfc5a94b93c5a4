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
//   - it has backreferences (not regular; no tokenizer needs them).
// Polynomial cases are accepted: GPT-2's own `\s+(?!\S)|\s+` is quadratic on a long run of spaces, and
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
      if (why || q.max !== Infinity) return;
      const el = q.element;
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
  return why;
}
