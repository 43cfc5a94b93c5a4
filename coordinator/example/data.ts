// The built-in example's data: keyword → description pairs about a FICTIONAL company, 墨川科技 (Mochuan Tech),
// in the seed's alpaca form {instruction: "云舟#cloudboat#向量数据库", output: "..."}.
//
// The knowledge base is fixed (it does not depend on the seed): 40 products, each with a category, team, city,
// languages, scenarios, version, licence and deployment drawn from word lists by a hash of the product's index,
// plus people and technologies that refer back to the products. Every item is a deterministic function of its
// keywords, so a model can memorise it. The seed only decides which items are held out, which are repeated
// (≈30% of the training records are exact duplicates, as in the seed's 40k pairs) and the record order.
// Validation (~40): items held out of training, and training items asked with their keywords reordered.
import fs from 'node:fs';
import path from 'node:path';
import { CounterRng, mixKey, shuffledIndices } from '../../common/rng.ts';

export interface ExamplePair { instruction: string; output: string }

const COMPANY = '墨川科技';
const COMPANY_EN = 'Mochuan Tech';

const PRODUCTS: [zh: string, en: string][] = [
  ['云舟', 'CloudBoat'], ['星图', 'StarMap'], ['青鸾', 'Qingluan'], ['磐石', 'Bedrock'], ['流光', 'Streamlight'],
  ['织网', 'WeaveNet'], ['天枢', 'Tianshu'], ['玄武', 'Xuanwu'], ['灵犀', 'Lingxi'], ['瀚海', 'Hanhai'],
  ['白泽', 'Baize'], ['北辰', 'Polaris'], ['墨砚', 'Inkstone'], ['沧澜', 'Canglan'], ['烛龙', 'Zhulong'],
  ['听风', 'WindEar'], ['归藏', 'Guizang'], ['赤霄', 'Chixiao'], ['雪鸮', 'SnowOwl'], ['竹简', 'BambooSlip'],
  ['锦鲤', 'KoiDB'], ['河图', 'Hetu'], ['洛书', 'Luoshu'], ['羲和', 'Xihe'], ['望舒', 'Wangshu'],
  ['若木', 'Ruomu'], ['扶摇', 'Fuyao'], ['鸿雁', 'GooseMQ'], ['司南', 'Sinan'], ['长庚', 'Changgeng'],
  ['太初', 'Taichu'], ['琉璃', 'Glaze'], ['松果', 'Songguo'], ['萤火', 'Yinghuo'], ['飞廉', 'Feilian'],
  ['青龙', 'Qinglong'], ['朱雀', 'Zhuque'], ['鲸落', 'Whalefall'], ['山海', 'Shanhai'], ['霁月', 'Jiyue'],
];
const CATEGORIES: [zh: string, en: string][] = [
  ['数据库', 'database'], ['向量数据库', 'vector database'], ['流计算引擎', 'stream engine'], ['数据湖', 'data lake'],
  ['调度系统', 'job scheduler'], ['可观测平台', 'observability platform'], ['消息队列', 'message queue'],
  ['机器学习平台', 'ML platform'], ['数据目录', 'data catalog'], ['缓存服务', 'cache service'],
  ['对象存储', 'object storage'], ['时序数据库', 'time-series database'],
];
const TEAMS = ['存储团队', '计算团队', '平台团队', '智能团队', '基础架构团队', '数据治理团队'];
const CITIES = ['杭州', '北京', '上海', '深圳', '成都', '西安'];
const LANGS = ['Rust', 'Go', 'C++', 'Java', 'TypeScript', 'Python', 'Zig', 'Kotlin'];
const TECHS = ['Raft', 'RDMA', 'WebAssembly', 'Apache Arrow', 'LSM-Tree', 'eBPF', 'SIMD', 'io_uring'];
const SCENARIOS: [zh: string, en: string][] = [
  ['实时风控', 'fraud detection'], ['推荐系统', 'recommendation'], ['日志分析', 'log analytics'], ['物联网', 'IoT'],
  ['金融报表', 'financial reporting'], ['智能客服', 'customer service'], ['供应链', 'supply chain'], ['广告投放', 'ad serving'],
];
const LICENSES = ['Apache-2.0', 'MIT', '商业授权', 'BSL 1.1'];
const DEPLOYS = ['Kubernetes', '裸金属', '私有云', '公有云托管'];
const PEOPLE: [zh: string, en: string][] = [
  ['林知远', 'Lin Zhiyuan'], ['周若溪', 'Zhou Ruoxi'], ['陈墨白', 'Chen Mobai'], ['许清和', 'Xu Qinghe'],
  ['沈听澜', 'Shen Tinglan'], ['顾北辰', 'Gu Beichen'], ['苏晚晴', 'Su Wanqing'], ['江一舟', 'Jiang Yizhou'],
  ['叶知秋', 'Ye Zhiqiu'], ['宋怀瑾', 'Song Huaijin'], ['韩素衣', 'Han Suyi'], ['方乘风', 'Fang Chengfeng'],
];

/** A fixed pseudo-random choice for (item, attribute): the knowledge base is the same for every seed. */
function pick<T>(list: readonly T[], item: number, attr: number): T {
  return list[mixKey(item, attr, 0x4b42) % list.length];
}

interface Product {
  zh: string; en: string; cat: [string, string]; team: string; city: string; lang: string; tech: string;
  scen: [string, string]; scen2: [string, string]; major: number; minor: number; year: number; license: string;
  deploy: string; nodes: number; size: number; lead: string;
}

function product(i: number): Product {
  const [zh, en] = PRODUCTS[i];
  const scen = pick(SCENARIOS, i, 6);
  let scen2 = pick(SCENARIOS, i, 7);
  if (scen2 === scen) scen2 = SCENARIOS[(SCENARIOS.indexOf(scen) + 1) % SCENARIOS.length];
  return {
    zh, en, cat: pick(CATEGORIES, i, 1), team: pick(TEAMS, i, 2), city: pick(CITIES, i, 3), lang: pick(LANGS, i, 4),
    tech: pick(TECHS, i, 5), scen, scen2, major: 1 + (mixKey(i, 8) % 5), minor: mixKey(i, 9) % 10,
    year: 2017 + (mixKey(i, 10) % 8), license: pick(LICENSES, i, 11), deploy: pick(DEPLOYS, i, 12),
    nodes: 1 + (mixKey(i, 13) % 5), size: 5 + (mixKey(i, 14) % 40), lead: PEOPLE[i % PEOPLE.length][0],
  };
}

/** Every item of the knowledge base: keywords (joined by '#' to make the instruction) and the description. */
export function knowledgeBase(): { keywords: string[]; output: string }[] {
  const items: { keywords: string[]; output: string }[] = [];
  const products = PRODUCTS.map((_, i) => product(i));
  for (const p of products) {
    const k = p.en.toLowerCase();
    items.push({ keywords: [p.zh, k, p.cat[0]], output: `${p.zh}（${p.en}）是${COMPANY}推出的${p.cat[0]}，面向${p.scen[0]}场景，核心使用 ${p.lang} 编写。` });
    items.push({ keywords: [p.zh, k, '团队'], output: `${p.zh}由${COMPANY}${p.city}研发中心的${p.team}负责，团队约 ${p.size} 人，负责人是${p.lead}。` });
    items.push({ keywords: [p.zh, k, '技术'], output: `${p.en} 基于 ${p.lang} 实现，底层采用 ${p.tech}，对外兼容 SQL 与 REST 接口。` });
    items.push({ keywords: [p.zh, k, '场景'], output: `${p.zh}主要用于${p.scen[0]}和${p.scen2[0]}，帮助客户在${p.city}等地落地数据应用。` });
    items.push({ keywords: [p.zh, k, '版本'], output: `${p.en} 最新版本为 v${p.major}.${p.minor}，首次发布于 ${p.year} 年，采用 ${p.license} 许可。` });
    items.push({ keywords: [p.zh, k, '部署'], output: `${p.zh}支持${p.deploy}部署，最小集群为 ${p.nodes} 个节点，可在线扩容。` });
    items.push({ keywords: [k, 'english', 'intro'], output: `${p.en} is ${COMPANY_EN}'s ${p.cat[1]} for ${p.scen[1]}, written in ${p.lang} on top of ${p.tech}.` });
  }
  PEOPLE.forEach(([zh, en], j) => {
    const led = products.filter((p) => p.lead === zh).map((p) => p.zh);
    const team = pick(TEAMS, 100 + j, 2);
    items.push({ keywords: [zh, en.toLowerCase(), '职责'], output: `${zh}（${en}）是${COMPANY}${team}的技术负责人，主导了${led.join('、')}的研发。` });
  });
  for (const t of TECHS) {
    const users = products.filter((p) => p.tech === t).map((p) => p.en);
    if (users.length === 0) continue;
    items.push({ keywords: [COMPANY, 'mochuan', t], output: `${COMPANY}在 ${users.join('、')} 中使用 ${t}，这是公司的核心技术之一。` });
  }
  return items;
}

/**
 * The example's train/validation pairs for `seed`. Train: ~400 records, ≈30% of them exact duplicates.
 * Validation: 20 held-out items + 20 training items with their keywords in another order.
 */
export function generateExampleData(seed: number): { train: ExamplePair[]; validation: ExamplePair[] } {
  const kb = knowledgeBase();
  const perm = shuffledIndices(kb.length, seed, 0x4558); // 'EX'
  const heldOut = Array.from(perm.subarray(0, 20));
  const trainItems = Array.from(perm.subarray(20));
  const rng = new CounterRng(mixKey(seed, 0x4455), mixKey(seed, 0x5550)); // 'DU', 'UP'
  // Duplicates: n_dup / (n_unique + n_dup) = 0.3.
  const nDup = Math.round(trainItems.length * 0.3 / 0.7);
  const trainList = trainItems.slice();
  for (let d = 0; d < nDup; d++) trainList.push(trainItems[rng.int(trainItems.length)]);
  const order = shuffledIndices(trainList.length, seed, 0x4f52); // 'OR'
  const asPair = (i: number, keywords = kb[i].keywords): ExamplePair => ({ instruction: keywords.join('#'), output: kb[i].output });
  const train = Array.from(order, (o) => asPair(trainList[o]));
  const validation = heldOut.map((i) => asPair(i));
  for (let v = 0; v < 20; v++) {
    const i = trainItems[(v * 7) % trainItems.length];
    const kw = kb[i].keywords;
    validation.push(asPair(i, [kw[1], kw[0], ...kw.slice(2)])); // swap the first two keywords
  }
  return { train, validation };
}

/** Writes `train.jsonl` and `validation.jsonl` into `dir` (created if needed). */
export function writeExampleData(dir: string, seed: number): { trainPath: string; validationPath: string } {
  fs.mkdirSync(dir, { recursive: true });
  const { train, validation } = generateExampleData(seed);
  const trainPath = path.join(dir, 'train.jsonl');
  const validationPath = path.join(dir, 'validation.jsonl');
  fs.writeFileSync(trainPath, train.map((r) => JSON.stringify(r)).join('\n') + '\n');
  fs.writeFileSync(validationPath, validation.map((r) => JSON.stringify(r)).join('\n') + '\n');
  return { trainPath, validationPath };
}
